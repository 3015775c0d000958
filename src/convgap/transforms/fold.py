"""fold_batchnorm: fold each BatchNorm that follows a convolution or linear layer into that
layer's weight and bias.

In eval mode a BatchNorm is a per-channel affine map of its input, ``y = (x - mean) *
gamma / sqrt(var + eps) + beta`` with its running statistics, so after a layer that is
linear per output channel (``nn.Conv1d/2d/3d``, ``nn.Linear``) it folds exactly into that
layer: ``w' = w * s``, ``b' = (b - mean) * s + beta`` with ``s = gamma / sqrt(var + eps)``
per output channel. Pairs are found by what the model computes, in the symbolic traces of
:func:`~convgap.transforms.trace.roots` (a BatchNorm call whose only input is a conv's output
that nothing else uses), so they are found in any model, not only in the zoo's classes.
"""

from __future__ import annotations

import copy
import warnings
from collections import Counter
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.utils import parametrize

from ..choice import relative_error, tolerance
from ..count import detached_copy, tensors
from ..errors import ConvgapError
from ..ops.batchnorm import folded
from ..progress import make_progress
from .changes import FOLDED_ATTR, LEFT_ATTR
from .eligible import blocker, first_inputs
from .refresh import refresh
from .select import Layers, select
from .trace import roots

__all__ = ["fold_batchnorm", "TOLERANCE"]

TOLERANCE = 1e-4  # relative error accepted in fp32 (widened to the rounding of fp16 / bf16)
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def fold_batchnorm(model: nn.Module, example_input: Any = None, *, layers: Layers = None,
                   inplace: bool = False, check: bool = True,
                   quiet: bool = False) -> nn.Module:
    """Fold every BatchNorm (``nn.BatchNorm1d/2d/3d``) that follows a convolution or linear
    layer into that layer's weight and bias; returns the model (a copy unless ``inplace``).

    A BatchNorm is folded when, in the symbolic trace of the model (or, where the whole
    does not trace, of its largest traceable submodules: :func:`~convgap.transforms.trace.
    roots`), its only input is the output of a plain ``nn.Conv1d/2d/3d`` (or a swapped
    :class:`~convgap.algorithms.AlgoConv2d`) or ``nn.Linear`` that nothing else uses, each
    module called once, with the same channel count. The layer's weight and bias are
    updated in place (its Parameter objects are kept; one without a bias gains one),
    computed in float64 and stored in the weight's dtype; the BatchNorm is replaced by an
    ``nn.Identity``. Every other BatchNorm is left as it is with the reason (after an
    addition, a pooling or another BatchNorm; ``track_running_stats=False``; a conv whose
    output is also used elsewhere, or that is called more than once). A ``BatchNorm1d``
    after a ``Linear`` folds only on a 2-D input (on more dims it normalizes dim 1, not
    the features), which only ``example_input`` shows: without it such a pair is left.
    :func:`convgap.changes` lists each fold ('fold', ``into`` the layer) and each
    BatchNorm left (with the reason).

    Folding uses the running statistics, i.e. the BatchNorm of eval mode: a model (or a
    selected BatchNorm) in training mode raises :class:`ConvgapError` (call
    ``model.eval()`` first). ``layers``: which BatchNorm modules are considered (None:
    all; names, a module type, or a callable ``(name, module) -> bool``:
    :mod:`convgap.transforms.select`).

    ``check`` (with ``example_input``): each folded layer is run on the input it sees in
    the original model and compared with the original layer + BatchNorm (relative error
    ``max|y - ref| / max|ref|`` at most :data:`TOLERANCE`, widened in fp16 / bf16); a
    pair that disagrees is unfolded, with a warning. Then the whole folded model is
    compared with the original's output; if it disagrees, every pair is unfolded, with a
    warning. Without ``example_input`` (or with ``check=False``) nothing is verified: the
    folding is exact algebra, but unchecked (with ``check=False`` the model still runs once
    on ``example_input`` if a Linear + BatchNorm1d pair needs its rank). ``quiet``: no
    progress bar while checking.
    """
    if not isinstance(model, nn.Module):
        raise ConvgapError(f"fold_batchnorm needs an nn.Module, got {type(model).__name__}")
    chosen = select(model, layers, lambda m: isinstance(m, _BatchNorm), lambda n, m: True,
                    "BatchNorm")
    modules = dict(model.named_modules())
    training = [n for n in chosen if modules[n].training]
    if model.training or training:
        what = "the model" if model.training else f"{training[0]} ({len(training)} in all)"
        raise ConvgapError(f"fold_batchnorm folds the running statistics a BatchNorm uses in "
                           f"eval mode, but {what} is in training mode: call model.eval() "
                           "first")
    pairs, left = _match(model, chosen)
    linear = [b for b, c in pairs.items() if isinstance(modules[c], nn.Linear)]
    measure = check and example_input is not None
    seen, refs, output = {}, {}, None
    if measure or (linear and example_input is not None):
        watched = {modules[n]: n for pair in pairs.items() for n in pair}
        seen, output = _run(model, watched, example_input)
    for b in linear:
        if b not in seen:
            left[b] = (f"follows the Linear {pairs[b]}: folds only on a 2-D input (on more "
                       "dims BatchNorm1d normalizes dim 1, not the features), and "
                       + ("its input's rank is unknown without example_input"
                          if example_input is None else "it was not called on example_input"))
            del pairs[b]
        elif seen[b][0].dim() != 2:
            left[b] = (f"follows the Linear {pairs[b]} on a {seen[b][0].dim()}-D input: "
                       f"BatchNorm1d normalizes dim 1, not {pairs[b]}'s features")
            del pairs[b]
    if measure:  # the original BatchNorm on its input: what each folded layer must give
        with torch.no_grad():
            refs = {b: modules[b](*seen[b]) for b, c in pairs.items() if b in seen and c in seen}
    if not inplace:
        model = copy.deepcopy(model)
        modules = dict(model.named_modules())
    undo = {}
    for b, c in pairs.items():
        undo[b] = _fold(modules[c], modules[b], keep=measure)
        folded = nn.Identity().train(modules[b].training)
        setattr(folded, FOLDED_ATTR, c)
        model.set_submodule(b, folded)
    for b, reason in left.items():
        setattr(modules[b], LEFT_ATTR, reason)
    if measure:
        with make_progress(quiet) as progress:
            task = progress.add_task("checking folded layers", total=len(refs) + 1)
            _check(model, modules, pairs, undo, seen, refs, output, example_input,
                   lambda: progress.advance(task))
    return model


def _bn_blocker(bn: nn.Module) -> str | None:
    """Why a BatchNorm cannot be folded whatever precedes it, or None."""
    cls = type(bn)
    if isinstance(bn, LazyModuleMixin) and bn.has_uninitialized_params():
        return f"{cls.__name__} is not initialized yet (run the model once)"
    if not bn.track_running_stats or bn.running_mean is None:
        return ("track_running_stats=False: it normalizes each batch with that batch's own "
                "statistics, which no fixed weights can")
    if cls.forward is not _BatchNorm.forward:
        return f"{cls.__name__} overrides BatchNorm.forward(): its computation is its own"
    if parametrize.is_parametrized(bn) or bn._forward_pre_hooks or bn._forward_hooks:
        return f"{cls.__name__} has forward hooks or parametrizations"
    return None


def _join(prefix: str, target: str) -> str:
    return f"{prefix}.{target}" if prefix else target


def _what(node: Any, prefix: str) -> str:
    """The operation that produced ``node``, in words."""
    if not isinstance(node, fx.Node):
        return f"a constant ({node!r})"
    if node.op == "placeholder":
        return f"the input of {prefix or 'the model'}"
    if node.op == "call_function":
        return f"the operation {getattr(node.target, '__name__', node.target)}"
    if node.op == "call_method":
        return f"the method .{node.target}()"
    return _join(prefix, str(node.target))


def _match(model: nn.Module, chosen: list[str]) -> tuple[dict[str, str], dict[str, str]]:
    """BatchNorm name -> the layer it folds into, and BatchNorm name -> why it stays, for
    the ``chosen`` BatchNorm modules of ``model``."""
    modules = dict(model.named_modules())
    owners = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    owners.update(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    calls: Counter = Counter()
    nodes: dict[str, tuple[fx.Node, str]] = {}
    wanted = set(chosen)
    for prefix, _, gm in roots(model):
        for node in gm.graph.nodes:
            if node.op == "call_module":
                calls[id(gm.get_submodule(node.target))] += 1
                name = _join(prefix, node.target)
                if name in wanted:
                    nodes.setdefault(name, (node, prefix))

    def shared(m: nn.Module) -> str | None:  # why folding would change another use of m
        if owners[id(m)] > 1:
            return "is registered under more than one name"
        if any(owners[id(p)] > 1 for p in m.parameters(recurse=False)):
            return "shares its parameters with another module"
        if calls[id(m)] > 1:
            return "is called more than once"
        return None

    pairs, left = {}, {}
    for b in chosen:
        bn = modules[b]
        reason = _bn_blocker(bn)
        if reason is None and (why := shared(bn)) is not None:
            reason = f"it {why}: folding would change its other uses"
        if reason is None and b not in nodes:
            reason = ("not called where the model traces (called by code torch.fx cannot "
                      "trace, or not at all)")
        if reason is not None:
            left[b] = reason
            continue
        node, prefix = nodes[b]
        src = node.args[0] if len(node.args) == 1 and not node.kwargs else None
        c = _join(prefix, str(src.target)) if isinstance(src, fx.Node) else None
        layer = modules.get(c) if src is not None and src.op == "call_module" else None
        if not isinstance(layer, (*_CONVS, nn.Linear)):
            left[b] = f"follows {_what(src, prefix)}, not a convolution or linear layer"
        elif (why := blocker(layer)) is not None:
            left[b] = f"follows {c}, which is not folded into: {why}"
        elif isinstance(layer, LazyModuleMixin) and layer.has_uninitialized_params():
            left[b] = f"follows {c}, which is not initialized yet (run the model once)"
        elif (why := shared(layer)) is not None:
            left[b] = f"follows {c}, which {why}: folding would change its other uses"
        elif len(src.users) > 1:
            others = ", ".join(u.name for u in src.users if u is not node)
            left[b] = (f"{c}'s output is also used elsewhere ({others}): folding would "
                       "change what that sees")
        elif (n := getattr(layer, "out_channels", getattr(layer, "out_features", None))) \
                != bn.num_features:
            left[b] = f"{bn.num_features} features, but {c} has {n} output channels"
        else:
            pairs[b] = c
    return pairs, left


def _run(model: nn.Module, watched: dict[nn.Module, str],
         example_input: Any) -> tuple[dict[str, tuple], Any]:
    """The first-call inputs of the ``watched`` modules and the model's output (copies)."""
    try:
        with torch.no_grad():
            seen, output = first_inputs(watched, lambda: model(example_input))
    except Exception as exc:
        shape = tuple(getattr(example_input, "shape", ()))
        raise ConvgapError(f"the model failed on example_input of shape {shape}: "
                           f"{exc}") from exc
    return seen, detached_copy(output)


@torch.no_grad()
def _fold(layer: nn.Module, bn: _BatchNorm, keep: bool) -> tuple | None:
    """Fold ``bn`` into ``layer``'s weight and bias (in place, in float64, stored in the
    weight's dtype); with ``keep``, return copies of the weight and bias before."""
    w, b = layer.weight, layer.bias
    before = (w.detach().clone(memory_format=torch.preserve_format),
              None if b is None else b.detach().clone()) if keep else None
    new_w, shift = folded(w, b, bn)
    w.copy_(new_w)
    if b is None:
        layer.bias = nn.Parameter(shift.to(w.device, w.dtype), requires_grad=w.requires_grad)
    else:
        b.copy_(shift)
    refresh(layer)
    return before


@torch.no_grad()
def _unfold(model: nn.Module, layer: nn.Module, bn: _BatchNorm, name: str,
            before: tuple, reason: str) -> None:
    """Undo :func:`_fold`: the weight and bias as they were, the BatchNorm back at ``name``
    with the ``reason`` it stays."""
    w, b = before
    layer.weight.copy_(w)
    if b is None:
        layer.bias = None
    else:
        layer.bias.copy_(b)
    refresh(layer)
    setattr(bn, LEFT_ATTR, reason)
    model.set_submodule(name, bn)


@torch.no_grad()
def _check(model: nn.Module, modules: dict[str, nn.Module], pairs: dict[str, str],
           undo: dict[str, tuple], seen: dict[str, tuple], refs: dict[str, Any],
           output: Any, x: Any, advance) -> None:
    """Each folded layer on its input in the original model against the original layer +
    BatchNorm (``refs``), then the whole model against ``output``; what disagrees is
    unfolded, with a warning."""
    problems, tols = [], [tolerance(TOLERANCE, t.dtype, t.device.type)
                          for t in tensors(output) if t.is_floating_point()]
    for b, ref in refs.items():
        c = pairs[b]
        tol = tolerance(TOLERANCE, ref.dtype, ref.device.type)
        err = relative_error(modules[c](*seen[c]), ref)
        if err > tol:
            reason = (f"folded into {c} it differed by {err:.2e} > {tol:.0e} on the "
                      "example input; left as it is")
            _unfold(model, modules[c], modules[b], b, undo.pop(b), reason)
            problems.append(f"{b}: {reason}")
        tols.append(tol)
        advance()
    tol = max(tols, default=TOLERANCE)
    err = relative_error(tensors(model(x)), tensors(output))
    if err > tol and undo:
        reason = (f"the folded model's output differed from the original's by {err:.2e} > "
                  f"{tol:.0e}; every BatchNorm is left as it is")
        for b, before in undo.items():
            _unfold(model, modules[pairs[b]], modules[b], b, before, reason)
        problems.append(reason)
    advance()
    if problems:
        warnings.warn("fold_batchnorm: " + "; ".join(problems), UserWarning, stacklevel=3)
