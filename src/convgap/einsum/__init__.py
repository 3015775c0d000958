"""conv_einsum: einsum whose modes may also be *convolved* between two operands, with an
exact cost model and an optimal contraction order (Rabbani et al., arXiv 2401.03384).

>>> y = einsum("bshw,oshw->bohw|hw", x, w, padding=1)        # == F.conv2d(x, w, padding=1)
>>> info = einsum_path("bshw,sr,rh,rw,or->bohw|hw", x, a, b, c, d, padding=1)
>>> print(info)                                                # path, MACs per step

See :mod:`convgap.einsum.parse` for the syntax, :mod:`.cost` for the cost model,
:mod:`.path` for the search and :mod:`.evaluate` for how steps map to torch ops.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Sequence, Union

import torch

from ..errors import ConvgapError
from ..ops.guard import untraced
from .cost import OBJECTIVES, Problem
from .evaluate import run_plan
from .parse import Expression, conv_params, conv_sizes, parse
from .path import OPTIMAL_MAX, PathInfo, Step, info, path_to_plan, search

__all__ = ["einsum", "einsum_path", "PathInfo", "Step", "Expression", "parse", "OBJECTIVES",
           "OPTIMAL_MAX", "clear_cache", "plan", "run_plan"]

_CACHE_SIZE = 1024
_cache: "OrderedDict[tuple, tuple[Problem, PathInfo]]" = OrderedDict()

PathSpec = Union[str, Sequence[Sequence[int]]]


def _shapes(operands) -> list[tuple[int, ...]]:
    out = []
    for i, op in enumerate(operands):
        if isinstance(op, torch.Tensor):
            with untraced():  # under jit.trace sizes would be traced values: plan by ints
                out.append(tuple(int(d) for d in op.shape))
        elif isinstance(op, (tuple, list, torch.Size)) and all(
                isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in op):
            out.append(tuple(op))
        else:
            raise ConvgapError(f"operand {i}: expected a tensor or a shape (a tuple of "
                               f"positive ints), got {op!r}")
    return out


def _freeze(v):
    """A hashable cache key that keeps types apart (True, 1 and 1.0 validate differently)."""
    if isinstance(v, dict):
        return ("dict", tuple(sorted((str(k), _freeze(x)) for k, x in v.items())))
    if isinstance(v, (list, tuple)):
        return ("seq", tuple(_freeze(x) for x in v))
    return (type(v).__name__, v)


def plan(expr: str, shapes, stride, padding, dilation, objective: str, path: PathSpec
         ) -> tuple[Problem, PathInfo]:
    """The problem and the path (cached per expression, shapes and parameters) for
    evaluating ``expr`` on operands of ``shapes`` (validated): what :func:`einsum_path`
    returns the second of and :func:`einsum` runs. Layers that evaluate an expression
    on every call plan it once per input shape here."""
    key = (expr, tuple(shapes), _freeze(stride), _freeze(padding), _freeze(dilation),
           objective, _freeze(path))
    hit = _cache.get(key)
    if hit is not None:
        _cache.move_to_end(key)
        return hit
    e = parse(expr)
    if len(shapes) != len(e.inputs):
        raise ConvgapError(f"einsum expression {e.text!r}: it has {len(e.inputs)} operand(s) "
                           f"but {len(shapes)} were given")
    kernels = {m: k for m, (_, k) in conv_sizes(e, shapes).items()} if all(
        len(s) == len(ops) for s, ops in zip(shapes, e.inputs)) else {}
    params = conv_params(e, stride, padding, dilation, kernels)
    p = Problem(e, shapes, params)
    if isinstance(path, str):
        order, method = search(p, objective, path)
    else:
        order, method = path_to_plan(path, p), "given"
    result = (p, info(p, order, objective, method))
    _cache[key] = result
    if len(_cache) > _CACHE_SIZE:
        _cache.popitem(last=False)
    return result


def einsum_path(expr: str, *operands, stride=1, padding=0, dilation=1,
                objective: str = "flops", path: PathSpec = "auto") -> PathInfo:
    """Plan ``expr`` for ``operands`` (tensors or shapes) without running it.

    ``objective``: 'flops' (total MACs), 'memory' (total elements written by the steps) or
    'combo' (MACs + 64 x elements). ``path``: 'auto' (optimal up to 8 operands, greedy
    beyond), 'optimal', 'greedy', 'left' (left to right), or an explicit opt_einsum-format
    path. Plans are cached per expression, shapes and parameters."""
    return plan(expr, _shapes(operands), stride, padding, dilation, objective, path)[1]


def einsum(expr: str, *operands: torch.Tensor, stride=1, padding=0, dilation=1,
           objective: str = "flops", path: PathSpec = "auto",
           fft: Union[str, bool] = "auto") -> torch.Tensor:
    """Evaluate a conv_einsum expression, e.g. ``einsum("bshw,oshw->bohw|hw", x, w,
    padding=1)`` (= ``F.conv2d(x, w, padding=1)``; convolution means cross-correlation, as
    in torch). Stride / padding / dilation: an int or a dict per convolved mode; padding
    also 'same', 'valid' or (left, right). Pairwise steps run in the cheapest order found
    by :func:`einsum_path` (same ``objective`` / ``path`` options); ``fft``: 'auto' (FFT for
    long kernels when estimated cheaper), True or False. Differentiable."""
    for i, op in enumerate(operands):
        if not isinstance(op, torch.Tensor):
            raise ConvgapError(f"operand {i}: expected a tensor, got {type(op).__name__} "
                               "(einsum_path takes shapes)")
    p, pinfo = plan(expr, _shapes(operands), stride, padding, dilation, objective, path)
    return run_plan(p, pinfo.plan, list(operands), fft)


def clear_cache() -> None:
    """Forget every cached plan."""
    _cache.clear()
