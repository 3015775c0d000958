"""A traced model lowered to a network program: the steps of one oneDNN plan
(:class:`convgap.layers.network.Program`), every activation and residual add folded into
the convolution before it.

``lower(model)`` reads ``model``'s symbolic trace (:func:`.trace.trace`; batch-norm already
folded, :func:`fold_batchnorm`) node by node: convolutions, linear layers, activations
(modules, functions, methods), max / average / global average pooling, additions,
multiplications by a broadcast tensor (a squeeze-excitation's gate), flattening before a
linear layer, concatenation along the channels, batch-norm not after a convolution (a
per-channel scale and shift: a depthwise 1x1 convolution), and the modules that compute
nothing in eval (identity, dropout). Then it folds: an activation into the step that makes its input (when that input
has no other reader), and an addition into a convolution making one of its operands (the
other operand accumulated into in place where it dies there, else read by a binary
post-op: :func:`convgap.layers.network.bind`). Anything else means the network is not
lowered, with the reason.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..algorithms.spec import explicit_padding
from ..layers.network import Program, Step
from .patterns import ADDS, MULS, PASS_THROUGH, flatten_call, global_pool, node_activation
from .trace import trace

__all__ = ["lower"]

_GAP_FUNCTIONS = {F.adaptive_avg_pool2d}


class _Refused(Exception):
    pass


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def _module_step(m: nn.Module, name: str) -> Step | None:
    """The step of a leaf module's call; None for one that computes nothing."""
    if isinstance(m, PASS_THROUGH):
        return None
    if type(m) is nn.Conv2d:
        if m.padding_mode != "zeros":
            raise _Refused(f"{name}: {m.padding_mode} padding")
        left, right, top, bottom = explicit_padding(m)
        return Step("conv", module=name, geometry={
            "stride": m.stride, "padding": (top, left, bottom, right),
            "dilation": m.dilation, "groups": m.groups})
    if type(m) is nn.Linear:
        return Step("linear", module=name)
    if type(m) is nn.BatchNorm2d:   # one fold_batchnorm left: not after a conv
        if m.running_mean is None or m.running_var is None:
            raise _Refused(f"{name}: batch-norm without running statistics")
        return Step("bn", module=name)
    if type(m) is nn.MaxPool2d:
        return _pool(name, "max", m.kernel_size, m.stride, m.padding, m.ceil_mode,
                     dilation=m.dilation, indices=m.return_indices)
    if type(m) is nn.AvgPool2d:
        return _pool(name, "avg_pad" if m.count_include_pad else "avg", m.kernel_size,
                     m.stride, m.padding, m.ceil_mode, divisor=m.divisor_override)
    if type(m) is nn.Hardsigmoid:
        return Step("act", act="hardsigmoid")
    if type(m) is nn.LeakyReLU:
        return Step("act", act=f"leaky_relu:{m.negative_slope!r}")
    if type(m) is nn.AdaptiveAvgPool2d and global_pool(m):
        return Step("pool", geometry={"kind": "avg", "kernel": (0, 0), "stride": (1, 1),
                                      "padding": (0, 0, 0, 0)})
    if type(m) is nn.Flatten and m.start_dim == 1 and m.end_dim == -1:
        return Step("flatten")
    raise _Refused(f"{name} ({type(m).__name__}) has no step in a oneDNN plan")


def _pool(name: str, kind: str, kernel, stride, padding, ceil: bool, dilation=1,
          indices: bool = False, divisor=None) -> Step:
    """A max / average pooling step (``kind`` 'max', 'avg' or 'avg_pad': padding counted);
    ``ceil``: torch's ceil_mode, its extra bottom / right padding set at bind."""
    if _pair(dilation) != (1, 1) or indices:
        raise _Refused(f"{name}: dilated max pooling or pooling returning indices")
    if divisor is not None:
        raise _Refused(f"{name}: average pooling with a divisor override")
    if ceil and kind == "avg_pad":   # torch's divisor ignores the extra padding: not oneDNN's
        raise _Refused(f"{name}: ceil_mode average pooling counting its padding")
    ph, pw = _pair(padding)
    return Step("pool", geometry={"kind": kind, "kernel": _pair(kernel),
                                  "stride": _pair(stride if stride else kernel),
                                  "padding": (ph, pw, ph, pw), "ceil": bool(ceil)})


def _functional_pool(node: fx.Node) -> Step | None:
    """``F.max_pool2d`` / ``F.avg_pool2d`` with their arguments, or None."""
    names = {F.max_pool2d: ("kernel_size", "stride", "padding", "dilation", "ceil_mode",
                            "return_indices"),
             F.avg_pool2d: ("kernel_size", "stride", "padding", "ceil_mode",
                            "count_include_pad", "divisor_override")}.get(node.target)
    if node.op != "call_function" or names is None:
        return None
    a = {"stride": None, "padding": 0, "dilation": 1, "ceil_mode": False,
         "return_indices": False, "count_include_pad": True, "divisor_override": None,
         **dict(zip(names, node.args[1:])), **node.kwargs}
    if node.target is F.max_pool2d:
        return _pool(node.name, "max", a["kernel_size"], a["stride"], a["padding"],
                     a["ceil_mode"], dilation=a["dilation"], indices=a["return_indices"])
    return _pool(node.name, "avg_pad" if a["count_include_pad"] else "avg",
                 a["kernel_size"], a["stride"], a["padding"], a["ceil_mode"],
                 divisor=a["divisor_override"])


def _is_cat(node: fx.Node) -> bool:
    """``torch.cat`` / ``torch.concat`` of a list of maps along the channels."""
    if node.op != "call_function" or node.target not in (torch.cat, torch.concat):
        return False
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    return isinstance(node.args[0], (list, tuple)) and dim in (1, -3)


def _is_gap(node: fx.Node) -> bool:
    """``x.mean((2, 3), keepdim=True)``, ``torch.mean(x, (-2, -1), True)`` or
    ``F.adaptive_avg_pool2d(x, 1)``."""
    if node.op == "call_function" and node.target in _GAP_FUNCTIONS:
        size = node.args[1] if len(node.args) > 1 else node.kwargs.get("output_size")
        return size in (1, (1, 1), [1, 1])
    if node.op == "call_method" and node.target == "mean" or \
            node.op == "call_function" and node.target is torch.mean:
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        keep = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
        return keep is True and isinstance(dims, (tuple, list)) and \
            sorted(d % 4 for d in dims) == [2, 3]
    return False


def _step_of(gm: fx.GraphModule, node: fx.Node) -> Step | None:
    """The unfused step a node computes; None for one that passes its input through."""
    act = node_activation(gm, node)
    if act is not None:
        return Step("act", act=act)
    if node.op == "call_function" and node.target is F.hardsigmoid:
        return Step("act", act="hardsigmoid")
    if node.op == "call_function" and node.target is F.leaky_relu:
        slope = node.args[1] if len(node.args) > 1 else node.kwargs.get("negative_slope",
                                                                         0.01)
        return Step("act", act=f"leaky_relu:{float(slope)!r}")
    if node.op == "call_module":
        return _module_step(gm.get_submodule(node.target), node.target)
    if node.op in ("call_function", "call_method"):
        target = node.target
        if target in ADDS or target == "add":
            return Step("add")
        if target in MULS or target == "mul":
            return Step("mul")
        if flatten_call(node):
            return Step("flatten")
        if _is_cat(node):
            return Step("cat")
        pool = _functional_pool(node)
        if pool is not None:
            return pool
        if _is_gap(node):
            return Step("pool", geometry={"kind": "avg", "kernel": (0, 0), "stride": (1, 1),
                                          "padding": (0, 0, 0, 0)})
        name = getattr(target, "__name__", str(target))
        raise _Refused(f"{node.name} ({name}) has no step in a oneDNN plan")
    raise _Refused(f"{node.name} ({node.op}) has no step in a oneDNN plan")


def _tensor_args(node: fx.Node, step: Step, values: dict[fx.Node, int]) -> tuple[int, ...]:
    """The value ids a node reads (its tensor arguments); an addition or multiplication
    takes exactly two tensors and nothing else."""
    if step.kind in ("add", "mul") and (
            len(node.args) != 2 or node.kwargs
            or not all(isinstance(a, fx.Node) for a in node.args)):
        raise _Refused(f"{node.name}: an operand the plan cannot take (a scalar, an alpha "
                       f"or a third argument)")
    if step.kind == "cat":
        if not all(isinstance(a, fx.Node) for a in node.args[0]):
            raise _Refused(f"{node.name}: a concat of something other than maps")
        return tuple(values[a] for a in node.args[0])
    return tuple(values[a] for a in (*node.args, *node.kwargs.values())
                 if isinstance(a, fx.Node))


def _unfused(gm: fx.GraphModule) -> Program:
    """One step per computing node, in graph order; aliases resolved."""
    values: dict[fx.Node, int] = {}
    steps: list[Step] = []
    flat: set[int] = set()   # values that are a flattened map (only a linear may read them)
    count = 0
    output = None
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            if count:
                raise _Refused("the model takes more than one input")
            values[node] = count
            count += 1
            continue
        if node.op == "get_attr":
            raise _Refused(f"{node.name}: a parameter read in the forward")
        if node.op == "output":
            out = node.args[0]
            if not isinstance(out, fx.Node):
                raise _Refused("the model returns more than one tensor")
            output = values[out]
            continue
        step = _step_of(gm, node)
        inputs = _tensor_args(node, step, values) if step is not None else tuple(
            values[a] for a in node.args if isinstance(a, fx.Node))
        if step is None or step.kind == "flatten":
            if len(inputs) != 1:
                raise _Refused(f"{node.name}: a pass-through of {len(inputs)} tensors")
            values[node] = inputs[0]
            if step is not None:
                flat.add(inputs[0])
            continue
        if step.kind != "cat" and len(inputs) != (2 if step.kind in ("add", "mul") else 1):
            raise _Refused(f"{node.name}: a {step.kind} of {len(inputs)} tensors")
        if any(i in flat for i in inputs) and step.kind != "linear":
            raise _Refused(f"{node.name}: a flattened map read by a {step.kind}")
        values[node] = count
        steps.append(replace(step, inputs=inputs, out=count))
        count += 1
    if output is None:
        raise _Refused("the model returns nothing")
    return Program(steps=steps, output=output, flat_output=output in flat)


def _readers(steps: list[Step], resolve) -> dict[int, list[int]]:
    """Value -> the steps reading it (``resolve``: a value's id after the folds so far)."""
    readers: dict[int, list[int]] = {}
    for i, s in enumerate(steps):
        for v in s.inputs:
            readers.setdefault(resolve(v), []).append(i)
    return readers


def _fold(program: Program) -> Program:
    """Activations into the step making their input, additions into a convolution making
    one operand; the folded convolution runs where the addition was."""
    steps = list(program.steps)
    alias: dict[int, int] = {}

    def resolve(v: int) -> int:
        while v in alias:
            v = alias[v]
        return v

    i = 0
    while i < len(steps):
        s = steps[i]
        s = replace(s, inputs=tuple(resolve(v) for v in s.inputs),
                    add_into=None if s.add_into is None else resolve(s.add_into))
        steps[i] = s
        readers = _readers(steps, resolve)
        sole = [v for v in s.inputs if len(readers.get(v, [])) == 1
                and v != resolve(program.output)]
        producer = {t.out: j for j, t in enumerate(steps[:i])}
        if s.kind == "act" and sole:
            j = producer.get(s.inputs[0])
            p = steps[j] if j is not None else None
            if p is not None and p.kind in ("conv", "linear", "add", "mul", "bn"):
                if p.add_into is None and p.act is None:
                    steps[j] = replace(p, act=s.act)
                elif p.add_into is not None and p.act_after is None:
                    steps[j] = replace(p, act_after=s.act)
                else:
                    p = None
                if p is not None:
                    alias[s.out] = p.out
                    del steps[i]
                    continue
        if s.kind == "add":
            for k, v in enumerate(s.inputs):
                j = producer.get(v)
                p = steps[j] if j is not None else None
                if (p is not None and p.kind == "conv" and p.add_into is None
                        and v in sole and s.inputs[0] != s.inputs[1]):
                    other = s.inputs[1 - k]
                    del steps[i]
                    del steps[j]
                    steps.insert(i - 1, replace(p, add_into=other))
                    alias[s.out] = p.out
                    break
            else:
                i += 1
            continue
        i += 1
    out = resolve(program.output)
    return Program(steps=steps, output=out, flat_output=program.flat_output)


def lower(model: nn.Module) -> Program | str:
    """``model``'s network program, or why it has none (a reason naming the node)."""
    gm = trace(model)
    if gm is None:
        return "the model does not trace symbolically"
    try:
        return _fold(_unfused(gm))
    except _Refused as exc:
        return str(exc)
