"""A whole-network plan (:class:`~convgap.layers.network.FusedNetwork`) as predicted ops,
and its steps timed where they run.

A network that :func:`convgap.fuse` lowered to one oneDNN plan runs no ATen operators: one
C call runs its primitives in turn (convolutions with their activations and residual adds
as post-ops, pooling, broadcast binaries, reorders), about 2 us apart. :func:`plan_ops`
lays out the steps that plan would run for an input shape without building it
(:class:`~convgap.kernels.cpu.plan.PlanSketch`, held to the real plan by a test) as
:class:`~convgap.predict.record.Op` s named ``'plan.<op>'`` (a convolution's arguments in
``aten.convolution``'s order, so its work and features are read as a convolution's), each
tagged with the module of its program step. :func:`plan_times` times each step of the
bound plan inside a run (oneDNN waited for after each primitive; the median over runs):
what calibration learns the plan kinds from, and what the benchmark checks per layer.
Seconds throughout.
"""

from __future__ import annotations

import statistics
from typing import Sequence

import torch
from torch.utils._pytree import tree_flatten

from ..errors import ConvgapError
from ..kernels.cpu import plan as cplan
from ..layers.network import FusedNetwork, bind
from ..ops.layouts import memory_format
from .record import Op, TensorSpec

__all__ = ["PLAN_PREFIX", "plan_ops", "plan_times", "network_of"]

PLAN_PREFIX = "plan."


def network_of(model: torch.nn.Module) -> FusedNetwork | None:
    """``model`` when it is a whole network :func:`convgap.fuse` lowered to a plan (and the
    plan can be built here), else None."""
    if isinstance(model, FusedNetwork) and cplan.unavailable() is None:
        return model
    return None


def _strides(dims: Sequence[int], nhwc: bool) -> tuple[int, ...]:
    if nhwc and len(dims) == 4:
        n, c, h, w = dims
        return (h * w * c, 1, w * c, c)
    return torch.empty(tuple(dims), device="meta").stride()


def plan_ops(net: FusedNetwork, input_shape: Sequence[int], layout: str = "nchw",
             dtype: torch.dtype = torch.float32, prefix: str = "model.") -> list[Op]:
    """The primitives ``net``'s plan runs on an input of ``input_shape`` (N, C, H, W) in
    ``layout``, in order, as ops: each reads its tensors (a convolution's or inner
    product's weight too, never written in the pass) and writes one; ``module`` is its
    program step's module (``prefix`` + the folded model's name; '' for a step of no
    module); ``detail`` (post-ops, add: 0 / 1 a sum in place / 2 a binary post-op, a
    pooling's kernel area, the codes of its activations before and after an add).
    Raises ConvgapError for a dtype other than float32."""
    if dtype != torch.float32:
        raise ConvgapError(f"the oneDNN plan runs float32, not {dtype}")
    x = torch.empty(tuple(input_shape), device="meta").contiguous(
        memory_format=memory_format(layout))
    sk = bind(net.program, net.model, x, into=cplan.PlanSketch())
    specs = [TensorSpec(d, _strides(d, nhwc) if t else tuple(x.stride()), dtype)
             for t, (d, nhwc) in enumerate(sk.tensors)]
    constants = len(specs)      # weights: numbers past the tensors'
    ops = []
    for step, module in zip(sk.steps_, sk.modules()):
        ins = [specs[t] for t in step.inputs]
        reads = list(step.inputs)
        if step.op == "convolution":
            g = step.geometry
            w = TensorSpec(step.weight, _strides(step.weight, False), dtype)
            args = (ins[0], w, None, list(g["stride"]), list(g["padding"][:2]),
                    list(g["dilation"]), False, [0, 0], g["groups"], *ins[1:])
            reads.insert(1, constants)
            constants += 1
        elif step.op == "inner_product":
            w = TensorSpec(step.weight, _strides(step.weight, False), dtype)
            args = (ins[0], w)
            reads.append(constants)
            constants += 1
        else:
            args = tuple(ins)
        leaves, tree = tree_flatten((args, {}))
        detail = (float(step.post_ops), float(step.add),
                  float(step.geometry["kernel"][0] * step.geometry["kernel"][1])
                  if "kernel" in step.geometry else 1.0, *map(float, step.acts))
        ops.append(Op(PLAN_PREFIX + step.op, prefix + module if module else "",
                      tuple(leaves), tree, (specs[step.output],), tuple(reads),
                      (step.output,), detail))
    return ops


@torch.no_grad()
def plan_times(net: FusedNetwork, x: torch.Tensor, repeats: int = 7, warmup: int = 2
               ) -> list[float]:
    """Each step's seconds (the median over ``repeats`` runs after ``warmup``) of ``net``'s
    plan for ``x``, in the order of :func:`plan_ops`: the plan ``net`` runs for ``x``
    where it runs one, else one bound for this (``net`` is left as it is). Raises
    ConvgapError where oneDNN has no plan for ``x``."""
    run = net.bound(x)
    plan = getattr(run, "plan", None)
    ref = net.model(x)
    if not ref.is_contiguous() and not ref.is_contiguous(memory_format=torch.channels_last):
        ref = ref.contiguous()
    if plan is None:   # not bound yet, or its blocks measured faster: a plan of its own
        plan = bind(net.program, net.model, x, tuple(ref.shape), tuple(ref.stride()))
    out = torch.empty_like(ref)
    plan.run_timed(x, out, warmup)
    return [statistics.median(t) for t in zip(*plan.run_timed(x, out, repeats))]
