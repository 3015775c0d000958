"""What a model runs, operator by operator, without running it.

:func:`record` runs the model's forward pass on meta tensors (its parameters and buffers
swapped for meta copies with ``torch.func.functional_call``; a model that makes CPU tensors
in its forward falls back to ``FakeTensorMode``, a few times slower): shapes, strides and
dtypes propagate, no arithmetic is done and no memory is touched. It keeps every ATen
operator the pass dispatches as an :class:`Op`: its name, its arguments with each tensor
replaced by a :class:`TensorSpec`, its outputs' specs and the innermost module it ran in.
These are the calls eager PyTorch makes, functional code in a ``forward`` included (a
residual ``+``, an ``F.relu``). :func:`replay` turns an :class:`Op` back into a callable on
real tensors of the same shapes and strides. Each op also names the tensors it reads and
writes (numbers unique within one recording), from which
:func:`~convgap.predict.features.context` tells how long ago its inputs were last touched.

convgap's fast paths (fused blocks, sparse dynamic blocks) step aside while a dispatch
mode watches (:func:`convgap.ops.guard.observed`): such a module (:mod:`.units`) is kept
as one *unit* op named ``'unit.<type>'``, reading the tensors its reference ops read from
outside it (its input first, then its weights), writing its output, its reference ops'
FLOPs, bytes and count and its density and granularity in ``detail``. Inside a module
that keeps what it computes from its weights alone (:data:`~convgap.predict.units.PREPARED`),
operators that do not depend on the model's input are left out. A model whose
forward needs real data (a mask decided by the values) cannot be recorded this way:
:func:`record` raises a ConvgapError naming the module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence, Union

import torch
import torch.nn as nn
from torch.utils._python_dispatch import _disable_current_modes
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..errors import ConvgapError
from ..ops.layouts import memory_format
from .units import PREPARED, TORCH_UNITS, describe, outermost, seed, unit_type

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
    outputs' specs; ``reads`` / ``writes``: which tensors its inputs / outputs are (in the
    order of :attr:`inputs` / ``outputs``; the same number is the same tensor within one
    recording); ``detail``: a unit's (reference FLOPs, reference bytes, reference op count,
    density, granularity), empty for an ATen op; ``inner``: a unit's reference ops;
    ``body``: the operators a unit that runs torch operators dispatches at its masks (a
    spatial dynamic block's torch path, :meth:`~convgap.layers.dynamic.DynamicBlock.
    sparse_shapes`: its gathers, GEMMs on the kept rows and scatters), empty for other
    units."""

    name: str
    module: str
    leaves: tuple
    tree: Any
    outputs: tuple[TensorSpec, ...]
    reads: tuple[int, ...] = ()
    writes: tuple[int, ...] = ()
    detail: tuple[float, ...] = ()
    inner: tuple["Op", ...] = ()
    body: tuple["Op", ...] = ()

    @property
    def unit(self) -> bool:
        return self.name.startswith(UNIT_PREFIX)

    @property
    def inputs(self) -> list[TensorSpec]:
        return [v for v in self.leaves if isinstance(v, TensorSpec)]

    def args(self) -> tuple[tuple, dict]:
        """(args, kwargs) with TensorSpecs in place of tensors."""
        return tree_unflatten(list(self.leaves), self.tree)

    def key(self) -> tuple:
        """What its cost depends on: the operator and its arguments (not the module)."""
        return (self.name, self.leaves)


UNIT_PREFIX = "unit."


def _spec(v: Any) -> Any:
    return TensorSpec.of(v) if isinstance(v, torch.Tensor) else v


_CONVS = (torch.ops.aten.convolution.default,)


def _channels_last(*ts: torch.Tensor) -> bool:
    return any(t.dim() == 4 and not t.is_contiguous()
               and t.is_contiguous(memory_format=torch.channels_last) for t in ts)


def _dense(t: torch.Tensor) -> bool:
    return t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last)


_aten = torch.ops.aten
# operators whose meta kernels are Python decompositions (0.4-1.7 ms a call: most of a
# recording's time) but whose outputs on a dense float32 meta input are plain: made here
# (an in-place one returns its input), with what the meta kernel gives (a test holds them
# to it)
_LIKE = {f: False for f in (_aten.relu.default, _aten.hardtanh.default, _aten.gelu.default,
                            _aten.silu.default, _aten.sigmoid.default,
                            _aten.hardswish.default, _aten.hardsigmoid.default)}
_LIKE.update({f: True for f in (_aten.relu_.default, _aten.hardtanh_.default,
                                _aten.silu_.default, _aten.hardswish_.default,
                                _aten.hardsigmoid_.default)})
_BINARY = {_aten.add.Tensor: False, _aten.mul.Tensor: False, _aten.add_.Tensor: True,
           _aten.mul_.Tensor: True}
_GEMMS = (_aten.addmm.default, _aten.mm.default)
_NORMS = (_aten.native_batch_norm.default, _aten._native_batch_norm_legit_no_training.default,
          _aten.native_layer_norm.default)


def _outputs(func, args: tuple) -> Any:
    """``func``'s outputs on ``args`` made without its meta kernel, or None where this does
    not know them (then the kernel runs)."""
    x = args[0] if args else None
    if not (isinstance(x, torch.Tensor) and x.device.type == "meta"
            and x.dtype == torch.float32):
        return None
    inplace = _LIKE.get(func)
    if inplace is not None:
        return x if inplace else (torch.empty_like(x) if _dense(x) else None)
    if func in _BINARY:     # two operands of one shape, strides and dtype: no broadcast
        y = args[1]
        if (isinstance(y, torch.Tensor) and y.shape == x.shape and y.stride() == x.stride()
                and y.dtype == x.dtype and y.device == x.device and _dense(x)):
            return x if _BINARY[func] else torch.empty_like(x)
        return None
    if func in _GEMMS:     # addmm(bias, a, b, ...), mm(a, b)
        a, b = args[1:3] if func is _aten.addmm.default else args[:2]
        if a.dim() == 2 and b.dim() == 2 and a.dtype == b.dtype == x.dtype:
            return a.new_empty((a.shape[0], b.shape[1]))
        return None
    if func not in _NORMS:
        return None
    if func is _aten.native_layer_norm.default:
        if not x.is_contiguous():
            return None
        stat = tuple(x.shape[:x.dim() - len(args[1])]) + (1,) * len(args[1])
        return (torch.empty_like(x), x.new_empty(stat), x.new_empty(stat))
    if x.dim() < 2 or not _dense(x):
        return None
    return (torch.empty_like(x), x.new_empty(x.shape[1]), x.new_empty(x.shape[1]))


class _Recorder(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self, where: Callable[[], str]) -> None:
        super().__init__()
        self.where = where
        self.ops: list[Op] = []
        self.inner: list[Op] | None = None   # a unit's reference ops, while inside one
        self.prepared: set[str] = set()     # names of PREPARED modules (see .units)
        self.from_input: set[int] = set()   # tensors computed from the model's input
        self._ids: dict[int, tuple[int, torch.Tensor]] = {}   # id() -> (number, tensor kept)

    def _number(self, t: torch.Tensor) -> int:
        found = self._ids.get(id(t))
        if found is None:
            found = self._ids[id(t)] = (len(self._ids), t)
        return found[0]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = _outputs(func, args)
        if out is None:
            out = func(*args, **kwargs)
        if func.namespace == "prim":   # metadata queries: no call in eager mode
            return out
        if func in _CONVS and out.device.type == "meta" and _channels_last(args[0], args[1]):
            # meta convolutions return contiguous outputs; on CPU (oneDNN) a channels-last
            # input or weight gives a channels-last output, as fake tensors know
            out = out.contiguous(memory_format=torch.channels_last)
        leaves, tree = tree_flatten((args, kwargs))
        outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        reads = tuple(self._number(v) for v in leaves if isinstance(v, torch.Tensor))
        writes = tuple(self._number(t) for t in outs)
        where = self.where()
        if any(r in self.from_input for r in reads):
            self.from_input.update(writes)
        elif where in self.prepared:
            return out        # computed from weights alone: kept between calls
        into = self.ops if self.inner is None else self.inner
        into.append(Op(str(func), where, tuple(_spec(v) for v in leaves), tree,
                       tuple(TensorSpec.of(t) for t in outs), reads, writes))
        return out

    def ops_of(self, run: Callable[[], Any]) -> list[Op]:
        """The ops ``run()`` dispatches, kept apart from the pass's."""
        kept, self.inner = self.inner, []
        try:
            run()
            return self.inner
        finally:
            self.inner = kept

    def unit(self, name: str, kind: str, x: torch.Tensor, out: Any, inner: list[Op],
             describe: tuple[float, float, float], body: Sequence[Op] = ()) -> None:
        """Keep the unit ``name`` (registered type ``kind``) that read ``x`` and returned
        ``out`` as one op, from its reference ops ``inner`` (``body``: see :class:`Op`)."""
        from .features import work
        written = {t for op in inner for t in op.writes}
        first = self._number(x)
        reads: dict[int, TensorSpec] = {first: TensorSpec.of(x)}
        for op in inner:
            for spec, t in zip(op.inputs, op.reads):
                if t not in written:
                    reads.setdefault(t, spec)
        flops = sum(work(op)[0] for op in inner)
        nbytes = sum(work(op)[1] for op in inner)
        outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        self.ops.append(Op(UNIT_PREFIX + kind, name, tuple(reads.values()), None,
                           tuple(TensorSpec.of(t) for t in outs), tuple(reads),
                           tuple(self._number(t) for t in outs),
                           (flops, nbytes, float(len(inner))) + describe, tuple(inner),
                           tuple(body)))


def _example(input_shape: Sequence[int], dtype: torch.dtype, layout: str) -> torch.Tensor:
    return torch.empty(tuple(input_shape), dtype=dtype).contiguous(
        memory_format=memory_format(layout))


Density = Union[float, Mapping[str, float], None]


@torch.no_grad()
def record(model: nn.Module, input_shape: Sequence[int], dtype: torch.dtype = torch.float32,
           layout: str = "nchw", density: Density = None) -> list[Op]:
    """Every ATen operator ``model``'s forward pass dispatches on an input of
    ``input_shape`` (N, C, H, W), ``dtype`` and ``layout`` ('nchw' or 'channels_last'; the
    model's weights as they are), in call order, each unit (:mod:`.units`) as one op.
    ``density``: of the dynamic blocks (one for all, or per block name; None: each one's
    forced density, else 1). The model is not run: see the module docstring. Raises
    ConvgapError where the forward pass needs real data."""
    memory_format(layout)   # checks the name
    x = _example(input_shape, dtype, layout)
    try:
        return _record(model, x, True, density)
    except Exception:    # noqa: BLE001 - e.g. a CPU tensor made in forward: fake tensors
        return _record(model, x, False, density)


def _meta_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Meta copies (same shapes, strides and dtypes) of the model's parameters and
    buffers, by name."""
    found = dict(model.named_parameters(remove_duplicate=False))
    found.update(model.named_buffers(remove_duplicate=False))
    return {k: torch.empty_strided(v.shape, v.stride(), dtype=v.dtype, device="meta")
            for k, v in found.items()}


def _record(model: nn.Module, x: torch.Tensor, meta: bool, density: Density) -> list[Op]:
    from torch._subclasses.fake_tensor import FakeTensorMode
    names = {m: n for n, m in model.named_modules()}
    units = outermost(model)
    stack: list[str] = []

    def pre(m, args):
        stack.append(names.get(m, stack[-1] if stack else ""))
        if m in units:
            recorder.inner = []

    def post(m, args, out):
        name = stack.pop()
        if m in units and recorder.inner is not None:
            inner, recorder.inner = recorder.inner, None
            d = density.get(name) if isinstance(density, Mapping) else density
            kind, x = unit_type(m), args[0]
            body: Sequence[Op] = ()
            with _disable_current_modes():   # its work share's ops are not the model's
                unit = describe(m, d, tuple(x.shape))
                # a torch-path unit's operators at its masks (meta tensors only: under fake
                # tensors the positions it keeps, read from the mask, are not known)
                torch_path = kind in TORCH_UNITS and meta
                if torch_path:
                    mask = m.seeded_mask(unit[0], int(x.shape[0]), tuple(x.shape[-2:]),
                                         seed(m))
                    weights = m.weight_shapes(x.device)
            if torch_path:
                body = recorder.ops_of(lambda: m.sparse_shapes(x, mask, weights))
            recorder.unit(name, kind, x, out, inner, unit, body)

    hooks = [m.register_forward_pre_hook(pre) for m in names] + [
        m.register_forward_hook(post, always_call=True) for m in names]
    recorder = _Recorder(lambda: stack[-1] if stack else "")
    recorder.prepared = {n for m, n in names.items() if isinstance(m, PREPARED)}
    try:
        if meta:
            state, xm = _meta_state(model), x.to("meta")
            recorder.from_input.add(recorder._number(xm))
            with recorder:
                torch.func.functional_call(model, state, (xm,))
        else:
            with FakeTensorMode(allow_non_fake_inputs=True) as fake:
                xf = fake.from_tensor(x)
                recorder.from_input.add(recorder._number(xf))
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
    """A callable running ``op`` (an ATen op, not a unit) on real tensors of its specs
    (random values, made now)."""
    if op.unit:
        raise ConvgapError(f"{op.name} is a module ({op.module}), not one ATen operator: "
                           "it cannot be replayed alone")
    func = _resolve(op.name)
    leaves = [v.make(generator) if isinstance(v, TensorSpec) else v for v in op.leaves]
    args, kwargs = tree_unflatten(leaves, op.tree)
    return lambda: func(*args, **kwargs)
