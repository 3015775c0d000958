"""A whole network run as one oneDNN plan: :class:`FusedNetwork`.

The network's :class:`Program` (its steps: convolutions with their activations and
residual sums folded in, pooling, linear layers, broadcast multiplications; made by
:func:`convgap.transforms.lower.lower`) is bound, per input shape and strides, to a
:class:`convgap.kernels.cpu.plan.Plan`: every step one oneDNN primitive, activations kept
in oneDNN's blocked layouts between them, buffers reused by liveness, the whole forward one
C call. No per-operator dispatch: at batch 1 torch's oneDNN operator spends 22-56 us per
call outside the primitive, the plan about 2.

The wrapped model is the torch path (autograd, tracing, ONNX export, counting, other
devices and dtypes) and the reference: each bound plan is checked against it on the input
it was bound for (fp32 relative error <= 1e-4), and runs torch where it disagrees.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn

from .. import choice
from ..errors import ConvgapError
from ..kernels.cpu import plan as cplan
from ..ops.memo import reuse
from .fused_blocks import FusedBlock

__all__ = ["Step", "Program", "FusedNetwork", "PlanWarning"]

TOLERANCE = 1e-4


class PlanWarning(UserWarning):
    """No plan for an input shape: it could not be built, or it disagreed with the model
    on its first input; the network runs without it."""


@dataclass(frozen=True)
class Step:
    """One step of a network program on value ids (0: the input; each step's ``out``):
    ``kind`` 'conv', 'linear', 'bn' (``module``: the layer's qualified name), 'pool'
    (``geometry``: kind, kernel ((0, 0): the whole map), stride, padding (top, left,
    bottom, right), ceil: torch's ceil_mode), 'add', 'mul' (the second input broadcast),
    'cat' (along the channels) or 'act'; ``act`` after
    it; a conv with ``add_into`` adds its result into that value in place, then
    ``act_after``."""

    kind: str
    inputs: tuple[int, ...] = ()
    out: int = -1
    module: str | None = None
    geometry: dict | None = field(default=None, compare=False)
    act: str | None = None
    add_into: int | None = None
    act_after: str | None = None


@dataclass
class Program:
    """The steps in run order, the value returned (``flat_output``: flattened to (N, -1))."""

    steps: list[Step]
    output: int
    flat_output: bool = False

    def key(self, model: nn.Module) -> str:
        """A digest of the steps and the shapes of the weights they read (the measured
        choice's key)."""
        parts = [repr(self.steps), str(self.output)]
        for s in self.steps:
            if s.module is not None:
                m = model.get_submodule(s.module)
                w = m.running_mean if s.kind == "bn" else m.weight
                parts.append(str(tuple(w.shape)))
            if s.geometry is not None:
                parts.append(repr(sorted(s.geometry.items())))
        return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]

    def __repr__(self) -> str:
        kinds: dict[str, int] = {}
        for s in self.steps:
            kinds[s.kind] = kinds.get(s.kind, 0) + 1
        folded = sum(s.add_into is not None for s in self.steps)
        acts = sum((s.act is not None) + (s.act_after is not None) for s in self.steps
                   if s.kind != "act")
        return (f"Program({len(self.steps)} steps: "
                f"{', '.join(f'{v} {k}' for k, v in kinds.items())}; "
                f"{folded} residual sums and {acts} activations folded)")


def _last_reads(program: Program) -> dict[int, int]:
    last: dict[int, int] = {}
    for i, s in enumerate(program.steps):
        for v in (*s.inputs, *(() if s.add_into is None else (s.add_into,))):
            last[v] = i
    last[program.output] = len(program.steps)
    return last


def _ceil_padding(size, kernel, stride, pad) -> tuple[int, int, int, int]:
    """(top, left, bottom, right) padding that makes a floor-mode pooling give torch's
    ceil_mode output: one more window where one starts inside the input or its left
    padding."""
    extra = []
    for n, k, s, p in zip(size, kernel, stride, pad[:2]):
        out = -(-(n + 2 * p - k) // s) + 1
        if (out - 1) * s >= n + p:
            out -= 1
        extra.append(max((out - 1) * s + k - n - p, p))
    return (pad[0], pad[1], extra[0], extra[1])


def bind(program: Program, model: nn.Module, x: torch.Tensor,
         out_shape: tuple[int, ...] | None = None, out_strides: tuple[int, ...] | None = None,
         layout: str = "nhwc", into: cplan.Plan | cplan.PlanSketch | None = None
         ) -> cplan.Plan | cplan.PlanSketch:
    """``program`` as a finalized plan for inputs of ``x``'s shape and strides (``x`` is
    not read: a meta tensor will do), writing an output of ``out_shape`` and
    ``out_strides`` (None: the last value's dims, flattened to (N, -1) where the program
    says, contiguous); weights read from ``model``'s modules; activations in ``layout``
    (:class:`~convgap.kernels.cpu.plan.Plan`). ``into``: the builder to use (a
    :class:`~convgap.kernels.cpu.plan.PlanSketch`: the steps without oneDNN); each
    program step's primitives are marked with its module (None: a step of no module)."""
    p = cplan.Plan(layout) if into is None else into
    ids = {0: p.input(x.shape, x.stride())}
    last = _last_reads(program)

    def dies(v: int, i: int) -> bool:   # value v is not read after step i
        return v != 0 and last.get(v, -1) <= i

    for i, s in enumerate(program.steps):
        src = [ids[v] for v in s.inputs]
        p.mark(s.module)
        if s.kind == "conv":
            m = model.get_submodule(s.module)
            g = s.geometry
            into = read = None   # the sum in the shortcut's buffer where it dies here
            if s.add_into is not None:
                if dies(s.add_into, i):
                    into = ids[s.add_into]
                else:
                    read = ids[s.add_into]
            ids[s.out] = p.conv(src[0], m.weight, m.bias, stride=g["stride"],
                                padding=g["padding"], dilation=g["dilation"],
                                groups=g["groups"], act=s.act, add_into=into,
                                add_from=read, act_after=s.act_after)
        elif s.kind == "bn":   # inference batch-norm as a depthwise 1x1 convolution
            m = model.get_submodule(s.module)
            scale = (m.running_var + m.eps).rsqrt()
            if m.weight is not None:
                scale = scale * m.weight
            shift = -m.running_mean * scale
            if m.bias is not None:
                shift = shift + m.bias
            c = scale.numel()
            ids[s.out] = p.conv(src[0], scale.detach().reshape(c, 1, 1, 1), shift.detach(),
                                stride=(1, 1), padding=(0,) * 4, dilation=(1, 1), groups=c,
                                act=s.act)
        elif s.kind == "linear":
            m = model.get_submodule(s.module)
            ids[s.out] = p.linear(src[0], m.weight, m.bias, act=s.act)
        elif s.kind == "pool":
            g = s.geometry
            pad = g["padding"]
            if g.get("ceil"):
                pad = _ceil_padding(p.dims(src[0])[2:], g["kernel"], g["stride"], pad)
            ids[s.out] = p.pool(src[0], g["kind"], g["kernel"], g["stride"], pad)
        elif s.kind == "cat":
            ids[s.out] = p.concat(src)
        elif s.kind in ("add", "mul"):
            a, b = src
            va, vb = s.inputs
            da, db = p.dims(a), p.dims(b)
            if da != db and len(da) == len(db) and all(d in (e, 1) for d, e in zip(da, db)):
                a, b, va, vb = b, a, vb, va       # the full operand first
            ids[s.out] = p.binary(a, b, s.kind, act=s.act, inplace=dies(va, i))
        elif s.kind == "act":
            ids[s.out] = p.eltwise(src[0], s.act, inplace=dies(s.inputs[0], i))
        else:
            raise ValueError(f"unknown step kind {s.kind!r}")
    p.mark(None)
    if out_shape is None:
        dims = p.dims(ids[program.output])
        out_shape = (dims[0], math.prod(dims[1:])) if program.flat_output else dims
        out_strides = torch.empty(out_shape, device="meta").stride()
    p.output(ids[program.output], out_shape, out_strides)
    p.finalize()
    return p


class FusedNetwork(FusedBlock):
    """A whole network run as one oneDNN plan (CPU, float32, inference) where that
    measures faster than its block-fused form: see the module's docstring.

    ``model`` (batch-norm folded) is the torch path and the reference; ``program`` its
    steps (:func:`convgap.transforms.lower.lower`); ``blocks`` (optional) the same network
    with its blocks fused (sharing ``model``'s parameters), the incumbent the plan is
    measured against per input shape (the one measured choice, kind 'fused_network':
    mobilenet_v2's fused blocks beat the plan at batch 8 here, the plan wins at batch 1).
    ``kernel_choice`` says what the last bound input runs ('plan', 'blocks' or 'torch').
    ``state_dict`` and ``load_state_dict`` are ``model``'s (same keys)."""

    pattern = "network"
    KIND = "fused_network"

    def __init__(self, model: nn.Module, program: Program,
                 blocks: nn.Module | None = None) -> None:
        super().__init__()
        self.model = model
        self.blocks = blocks
        self.program = program
        self.kernel_choice = None

    def extra_repr(self) -> str:
        return repr(self.program)

    def __getattr__(self, name: str):
        """Attributes it does not have are the wrapped network's (``fused.layer1[0]`` is
        the block-fused model's, or the folded model's without one)."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            modules = self.__dict__.get("_modules") or {}
            inner = modules.get("blocks") or modules.get("model")
            if inner is None:
                raise
            return getattr(inner, name)

    def parameter_owner(self) -> nn.Module:
        """The module holding the network's weights once (:func:`convgap.count.weight_owner`):
        the folded model (the block-fused copy repeats them)."""
        return self.model

    def state_dict(self, *args, **kwargs):  # the wrapped model's keys, no 'model.' prefix
        return self.model.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        return self.model.load_state_dict(state_dict, strict=strict, assign=assign)

    def fast_path_ok(self, x: torch.Tensor) -> bool:
        return super().fast_path_ok(x) and not self.training

    MAX_SHAPES = 8   # input shapes kept bound at once (the oldest is dropped)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The bound run for ``x``'s shape and strides (built, checked and measured on the
        first input of each; up to :attr:`MAX_SHAPES` kept, so alternating batch sizes do
        not rebind), or :meth:`reference` where the fast path may not run."""
        if x.is_cuda or not self.fast_path_ok(x):
            return self.reference(x)
        key = ("plan", tuple(x.shape), x.stride())
        store = self._store
        if key not in store:
            bound = [k for k in store if isinstance(k, tuple) and k[:1] == ("plan",)]
            if len(bound) >= self.MAX_SHAPES:
                del store[bound[0]]
        return reuse(store, key, self._params(), lambda: self._bind(x))(x)

    def _params(self) -> list[torch.Tensor]:
        """The tensors the plan reads, listed once (the bound plans' memo key: a change to
        any of them, in place or by ``load_state_dict``, rebinds; and the fast-path
        guard): the weights and biases of its convolutions and linear layers, and its
        batch-norms' statistics and affine parameters; not the block-fused model's copies
        (half the parameters: their signature cost 25-39 us a call)."""
        read = self._params_list
        if read is None:
            read = []
            for s in self.program.steps:
                if s.module is not None:
                    m = self.model.get_submodule(s.module)
                    names = ("running_mean", "running_var", "weight", "bias") \
                        if s.kind == "bn" else ("weight", "bias")
                    read += [t for t in (getattr(m, n) for n in names) if t is not None]
            self._params_list = read
        return read

    def bound(self, x: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """What an input of ``x``'s shape and strides runs, once bound (None before): the
        plan's run (its :class:`~convgap.kernels.cpu.plan.Plan` as ``.plan``), the
        block-fused model or the folded one."""
        hit = self._store.get(("plan", tuple(x.shape), x.stride()))
        return None if hit is None else hit[2]

    def spec(self) -> str:
        return f"network {self.program.key(self.model)}"

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """The block-fused model (its blocks run their torch ops under autograd, tracing
        and watching modes), or the folded model without one."""
        return (self.blocks if self.blocks is not None else self.model)(x)

    def _bind(self, x: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        incumbent = self.blocks if self.blocks is not None else self.model
        with torch.no_grad():
            ref = self.model(x)
        if cplan.unavailable() is not None or ref.dtype != torch.float32:
            self.kernel_choice = "blocks" if self.blocks is not None else "torch"
            return incumbent
        if not ref.is_contiguous() and not ref.is_contiguous(
                memory_format=torch.channels_last):
            ref = ref.contiguous()
        shape, strides = tuple(ref.shape), tuple(ref.stride())
        try:
            plan = bind(self.program, self.model, x, shape, strides)
        except ConvgapError as exc:   # a step oneDNN has only reference code for, ...
            warnings.warn(f"no oneDNN plan for an input of shape {tuple(x.shape)}: {exc}",
                          PlanWarning, stacklevel=3)
            self.kernel_choice = "blocks" if self.blocks is not None else "torch"
            return incumbent

        def run(x: torch.Tensor) -> torch.Tensor:
            return plan.run(x, torch.empty_strided(shape, strides))

        err = choice.relative_error(run(x), ref)
        if not err <= TOLERANCE:
            warnings.warn(f"the oneDNN plan disagrees with the model by {err:.2e} on an "
                          f"input of shape {tuple(x.shape)}; running without it",
                          PlanWarning, stacklevel=3)
            self.kernel_choice = "blocks" if self.blocks is not None else "torch"
            return incumbent
        run.plan = plan  # type: ignore[attr-defined]
        if self.blocks is None:
            self.kernel_choice = "plan"
            return run
        return self._choose(x, {"blocks": self.blocks, "plan": run}, ())
