"""What a model runs, operator by operator, without running it.

:func:`record` runs the model's forward pass on meta tensors (its parameters and buffers
swapped for meta copies with ``torch.func.functional_call``; a model that makes CPU tensors
in its forward falls back to ``FakeTensorMode``, a few times slower): shapes, strides and
dtypes propagate, no arithmetic is done and no memory is touched. It keeps every ATen
operator the pass dispatches as an :class:`Op`: its name, its arguments with each tensor
replaced by a :class:`TensorSpec`, its outputs' specs and the innermost module it ran in.
These are the calls eager PyTorch makes, functional code in a ``forward`` included (a
residual ``+``, an ``F.relu``). :func:`replay` turns an :class:`Op` back into a callable on
real tensors of the same shapes and strides, for timing it alone (calibration, and the
per-operator check of the benchmark).

convgap's fast paths (C kernels, fused blocks) step aside while a dispatch mode watches
(:func:`convgap.ops.guard.observed`): what is recorded is their reference ops. A model
whose forward needs real data (a mask decided by the values) cannot be recorded this way:
:func:`record` raises a ConvgapError naming the module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..errors import ConvgapError
from ..ops.layouts import memory_format

__all__ = ["TensorSpec", "Op", "record", "replay"]


@dataclass(frozen=True)
class TensorSpec:
    """A tensor's shape, strides (elements) and dtype."""

    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype

    @classmethod
    def of(cls, t: torch.Tensor) -> "TensorSpec":
        return cls(tuple(t.shape), tuple(t.stride()), t.dtype)

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    @property
    def channels_last(self) -> bool:
        """4-d with channels innermost (and more than one channel and pixel)."""
        if len(self.shape) != 4 or self.shape[1] == 1 or self.shape[2] * self.shape[3] == 1:
            return False
        return self.stride[1] == 1

    def make(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """A real tensor of this spec, standard-normal values (integers: zeros; bools:
        False)."""
        t = torch.empty_strided(self.shape, self.stride, dtype=self.dtype)
        if self.dtype.is_floating_point:
            t.normal_(generator=generator)
        else:
            t.zero_()
        return t


@dataclass(frozen=True, eq=False)
class Op:
    """One dispatched ATen operator. ``name``: e.g. 'aten.convolution.default';
    ``module``: the innermost module it ran in ('' for the model's own forward);
    ``leaves``: its arguments (args, kwargs) flattened, tensors as :class:`TensorSpec`;
    ``tree``: how to rebuild (args, kwargs) from ``leaves``; ``outputs``: its tensor
    outputs' specs."""

    name: str
    module: str
    leaves: tuple
    tree: Any
    outputs: tuple[TensorSpec, ...]

    @property
    def inputs(self) -> list[TensorSpec]:
        return [v for v in self.leaves if isinstance(v, TensorSpec)]

    def args(self) -> tuple[tuple, dict]:
        """(args, kwargs) with TensorSpecs in place of tensors."""
        return tree_unflatten(list(self.leaves), self.tree)

    def key(self) -> tuple:
        """What its cost depends on: the operator and its arguments (not the module)."""
        return (self.name, self.leaves)


def _spec(v: Any) -> Any:
    return TensorSpec.of(v) if isinstance(v, torch.Tensor) else v


_CONVS = (torch.ops.aten.convolution.default,)


def _channels_last(*ts: torch.Tensor) -> bool:
    return any(t.dim() == 4 and not t.is_contiguous()
               and t.is_contiguous(memory_format=torch.channels_last) for t in ts)


class _Recorder(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self, where: Callable[[], str]) -> None:
        super().__init__()
        self.where = where
        self.ops: list[Op] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func.namespace == "prim":   # metadata queries: no call in eager mode
            return out
        if func in _CONVS and out.device.type == "meta" and _channels_last(args[0], args[1]):
            # meta convolutions return contiguous outputs; on CPU (oneDNN) a channels-last
            # input or weight gives a channels-last output, as fake tensors know
            out = out.contiguous(memory_format=torch.channels_last)
        leaves, tree = tree_flatten((args, kwargs))
        outs = [TensorSpec.of(t) for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        self.ops.append(Op(str(func), self.where(), tuple(_spec(v) for v in leaves), tree,
                           tuple(outs)))
        return out


def _example(input_shape: Sequence[int], dtype: torch.dtype, layout: str) -> torch.Tensor:
    return torch.empty(tuple(input_shape), dtype=dtype).contiguous(
        memory_format=memory_format(layout))


@torch.no_grad()
def record(model: nn.Module, input_shape: Sequence[int], dtype: torch.dtype = torch.float32,
           layout: str = "nchw") -> list[Op]:
    """Every ATen operator ``model``'s forward pass dispatches on an input of
    ``input_shape`` (N, C, H, W), ``dtype`` and ``layout`` ('nchw' or 'channels_last'; the
    model's weights as they are), in call order. The model is not run: see the module
    docstring. Raises ConvgapError where the forward pass needs real data."""
    memory_format(layout)   # checks the name
    x = _example(input_shape, dtype, layout)
    try:
        return _record(model, x, meta=True)
    except Exception:    # noqa: BLE001 - e.g. a CPU tensor made in forward: fake tensors
        return _record(model, x, meta=False)


def _meta_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Meta copies (same shapes, strides and dtypes) of the model's parameters and
    buffers, by name."""
    found = dict(model.named_parameters(remove_duplicate=False))
    found.update(model.named_buffers(remove_duplicate=False))
    return {k: torch.empty_strided(v.shape, v.stride(), dtype=v.dtype, device="meta")
            for k, v in found.items()}


def _record(model: nn.Module, x: torch.Tensor, meta: bool) -> list[Op]:
    from torch._subclasses.fake_tensor import FakeTensorMode
    names = {m: n for n, m in model.named_modules()}
    stack: list[str] = []

    def pre(m, args):
        stack.append(names.get(m, stack[-1] if stack else ""))

    def post(m, args, out):
        stack.pop()

    hooks = [m.register_forward_pre_hook(pre) for m in names] + [
        m.register_forward_hook(post, always_call=True) for m in names]
    recorder = _Recorder(lambda: stack[-1] if stack else "")
    try:
        if meta:
            state, xm = _meta_state(model), x.to("meta")
            with recorder:
                torch.func.functional_call(model, state, (xm,))
        else:
            with FakeTensorMode(allow_non_fake_inputs=True) as fake:
                xf = fake.from_tensor(x)
                with recorder:
                    model(xf)
    except ConvgapError:
        raise
    except Exception as exc:   # noqa: BLE001 - any failure of the fake pass is reported
        if meta:
            raise
        where = stack[-1] if stack else type(model).__name__
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConvgapError(f"cannot record the operators of {where or 'the model'} without "
                           f"running it ({type(exc).__name__}: {first[:200]}): its forward "
                           f"needs real data") from exc
    finally:
        for h in hooks:
            h.remove()
    return recorder.ops


def _resolve(name: str):
    namespace, op, overload = name.split(".")
    return getattr(getattr(getattr(torch.ops, namespace), op), overload)


def replay(op: Op, generator: torch.Generator | None = None) -> Callable[[], Any]:
    """A callable running ``op`` on real tensors of its specs (random values, made now)."""
    func = _resolve(op.name)
    leaves = [v.make(generator) if isinstance(v, TensorSpec) else v for v in op.leaves]
    args, kwargs = tree_unflatten(leaves, op.tree)
    return lambda: func(*args, **kwargs)
