"""Block patterns, recognised by what a block computes: :func:`describe` reads a module's
symbolic trace (:mod:`.trace`) as a :class:`Chain`, and the registry's patterns
(:data:`PATTERNS`, :func:`register`) say which chains they fuse and build the fused module.

A chain is the block's body (the operations from its input to the residual add, in order),
its shortcut (None: no residual; ``[]``: the input itself; else the operations on it) and
the activations after the add. Operations are normalised: a ``nn.ReLU6`` module,
``F.relu6`` and ``F.hardtanh(x, 0, 6)`` are all the activation 'relu6'; ``nn.Identity``,
dropout (eval) and ``contiguous()`` vanish; a multiplication by a parameter is a 'scale';
``x * gate(x)`` with ``gate`` a chain from ``x`` is a squeeze-excitation 'se' holding that
chain. So a block written as a ``Sequential``, with functional calls, or under another
class name matches the same pattern as the zoo's.

Patterns see batch-norm already folded (``fuse`` runs ``fold_batchnorm`` first): a
BatchNorm left in a chain is one that does not follow a convolution, and no pattern takes
it. The first pattern (in registry order) whose ``match`` returns None fuses the block.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..algorithms.module import AlgoConv2d
from ..algorithms.linear import AlgoLinear
from ..algorithms.spec import explicit_padding
from ..layers import fused_blocks as fb
from .eligible import blocker
from .trace import roots, trace

__all__ = ["Op", "Chain", "Unmatched", "Pattern", "PATTERNS", "register", "describe", "match",
           "HEAD", "Head", "find_head", "STEM", "find_stems", "CONV_ACT", "ConvAct",
           "find_conv_acts", "node_activation", "flatten_call", "global_pool", "PASS_THROUGH",
           "ADDS", "MULS", "NETWORK",
           "block_patterns"]

CONV_ACT = "conv_act"  # a conv + act: a block of its own, or written outside any block


@dataclass
class Op:
    """One operation of a chain: ``kind`` ('conv', 'linear', 'act', 'layernorm',
    'permute', 'scale', 'pool', 'se', 'bn', 'flatten'), the module (for module ops), its
    qualified name in the block, and ``arg`` (the activation's name, the permutation, the
    scale tensor, the squeeze-excitation's chain)."""

    kind: str
    module: nn.Module | None = None
    name: str | None = None
    arg: Any = None

    def __repr__(self) -> str:
        if self.kind == "act":
            return f"act:{self.arg}"
        if self.kind == "conv":
            m = self.module
            k = "x".join(map(str, m.kernel_size))
            g = "" if m.groups == 1 else ("/dw" if m.groups == m.in_channels else
                                          f"/g{m.groups}")
            return f"conv{k}{g}"
        if self.kind == "se":
            return f"se{self.arg}"
        return self.kind


@dataclass
class Chain:
    """What a block computes: ``body`` ops, ``shortcut`` (None: no residual add; []: the
    input; else ops), ``post`` activations after the add."""

    body: list[Op]
    shortcut: list[Op] | None = None
    post: list[Op] = field(default_factory=list)

    def kinds(self) -> list[str]:
        return [o.kind for o in self.body]

    def __repr__(self) -> str:
        s = " -> ".join(map(repr, self.body))
        if self.shortcut is not None:
            s += " + " + (" -> ".join(map(repr, self.shortcut)) or "x")
        if self.post:
            s += " -> " + " -> ".join(map(repr, self.post))
        return s


class _NoMatch(Exception):
    pass


class Unmatched(str):
    """Why a module is not a chain (a string); ``residual``: its output is a residual add
    (it looks like a block)."""

    residual: bool = False


def _unmatched(reason: str, residual: bool) -> Unmatched:
    u = Unmatched(reason)
    u.residual = residual
    return u


# activation functions and methods, by target
_ACT_FUNCTIONS = {F.relu: "relu", torch.relu: "relu", F.relu6: "relu6", F.silu: "silu",
                  F.gelu: "gelu", torch.sigmoid: "sigmoid", F.sigmoid: "sigmoid",
                  F.hardswish: "hardswish", torch.tanh: "tanh", F.tanh: "tanh",
                  torch.nn.functional.hardtanh: "hardtanh"}
_ACT_METHODS = {"relu": "relu", "relu_": "relu", "sigmoid": "sigmoid", "tanh": "tanh"}
_ACT_MODULES = {nn.ReLU: "relu", nn.ReLU6: "relu6", nn.SiLU: "silu", nn.Sigmoid: "sigmoid",
                nn.Hardswish: "hardswish", nn.Tanh: "tanh"}
PASS_THROUGH = (nn.Identity, nn.Dropout, nn.Dropout2d)  # modules computing nothing in eval
ADDS = {operator.add, operator.iadd, torch.add}          # additions, by call target
MULS = {operator.mul, operator.imul, torch.mul}          # multiplications, by call target


def _module_op(m: nn.Module, name: str) -> Op | None:
    """The op of a leaf module call; None for one that computes nothing in eval."""
    if isinstance(m, PASS_THROUGH):
        return None
    t = type(m)
    if t in _ACT_MODULES:
        return Op("act", m, name, _ACT_MODULES[t])
    if t is nn.GELU:
        return Op("act", m, name, "gelu" if m.approximate == "none" else "gelu_tanh")
    if t is nn.Hardtanh and (m.min_val, m.max_val) == (0.0, 6.0):
        return Op("act", m, name, "relu6")
    if isinstance(m, nn.Conv2d) and (isinstance(m, AlgoConv2d) or blocker(m) is None):
        return Op("conv", m, name)
    if isinstance(m, nn.Linear) and (isinstance(m, AlgoLinear) or blocker(m) is None):
        return Op("linear", m, name)
    if t is nn.LayerNorm:
        return Op("layernorm", m, name)
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        return Op("bn", m, name)
    if t is nn.AdaptiveAvgPool2d and m.output_size in (1, (1, 1)):
        return Op("pool", m, name)
    if t is nn.Flatten:
        return Op("flatten", m, name)
    raise _NoMatch(f"{name} ({t.__name__}) is not an operation any pattern fuses")


def _function_act(node: fx.Node) -> str | None:
    if node.op == "call_function" and node.target in _ACT_FUNCTIONS:
        name = _ACT_FUNCTIONS[node.target]
        if name == "gelu" and node.kwargs.get("approximate", "none") == "tanh":
            return "gelu_tanh"
        if name == "hardtanh":
            lo = node.args[1] if len(node.args) > 1 else node.kwargs.get("min_val", -1.0)
            hi = node.args[2] if len(node.args) > 2 else node.kwargs.get("max_val", 1.0)
            return "relu6" if (lo, hi) == (0.0, 6.0) else None
        return name
    if node.op == "call_method" and node.target in _ACT_METHODS:
        return _ACT_METHODS[node.target]
    return None


def node_activation(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """The activation (a name of :data:`convgap.ops.activations.ACTIVATIONS`) a traced
    node computes (an activation module's call, function or method), or None."""
    if node.op == "call_module":
        try:
            op = _module_op(gm.get_submodule(node.target), node.target)
        except _NoMatch:
            return None
        return op.arg if op is not None and op.kind == "act" else None
    return _function_act(node)


class _Reader:
    """Walks a block's trace backwards from a node to a stop node, collecting ops."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm

    def _param(self, node: Any) -> torch.Tensor | None:
        if isinstance(node, fx.Node) and node.op == "get_attr":
            t = self.gm
            for part in node.target.split("."):
                t = getattr(t, part)
            return t if isinstance(t, torch.Tensor) else None
        return None

    def walk(self, node: fx.Node, stop: fx.Node) -> list[Op]:
        """The ops from ``stop`` (exclusive) to ``node`` (inclusive). Every node passed
        must feed only the next one (a squeeze-excitation's input feeds two: the gate's
        chain and the product)."""
        ops: list[Op] = []
        shared: set = set()
        while node is not stop:
            if not isinstance(node, fx.Node) or node.op in ("placeholder", "output"):
                raise _NoMatch("the chain does not start at the block input")
            if len(node.users) > (2 if node in shared else 1):
                raise _NoMatch(f"{node.name} feeds {len(node.users)} operations")
            node = self._step(node, ops)
            if ops and ops[-1].kind == "se":
                shared.add(node)
        ops.reverse()
        return ops

    def _step(self, node: fx.Node, ops: list[Op]) -> fx.Node:
        """Append ``node``'s op (if any) and return its input node."""
        tensor_args = [a for a in node.args if isinstance(a, fx.Node)]
        if node.op == "call_module":
            op = _module_op(self.gm.get_submodule(node.target), node.target)
            if op is not None:
                ops.append(op)
            return node.args[0]
        act = _function_act(node)
        if act is not None:
            ops.append(Op("act", arg=act))
            return node.args[0]
        if node.op == "call_function" and node.target in (F.hardtanh,):
            raise _NoMatch("hardtanh other than (0, 6)")
        if node.op == "call_method" and node.target in ("contiguous", "clone"):
            return node.args[0]
        if (node.op == "call_method" and node.target == "permute") or (
                node.op == "call_function" and node.target is torch.permute):
            dims = node.args[1:] if node.op == "call_method" else node.args[1]
            if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
                dims = dims[0]
            ops.append(Op("permute", arg=tuple(dims)))
            return node.args[0]
        if node.op == "call_function" and node.target in MULS and len(node.args) == 2:
            a, b = node.args
            for t, other in ((self._param(a), b), (self._param(b), a)):
                if t is not None and isinstance(other, fx.Node):
                    ops.append(Op("scale", arg=t))
                    return other
            if isinstance(a, fx.Node) and isinstance(b, fx.Node):
                for src, gate in ((a, b), (b, a)):
                    try:
                        se = self.walk(gate, src)
                    except _NoMatch:
                        continue
                    if len(src.users) != 2:
                        continue
                    ops.append(Op("se", arg=se))
                    return src
        if node.op == "call_method" and node.target == "mean" and len(tensor_args) == 1:
            dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
            keep = node.kwargs.get("keepdim", node.args[2] if len(node.args) > 2 else False)
            if tuple(dims or ()) in ((2, 3), (-2, -1)) and keep:
                ops.append(Op("pool"))
                return node.args[0]
        raise _NoMatch(f"{node.op} {getattr(node.target, '__name__', node.target)} is not "
                       "an operation any pattern fuses")


def _read(gm: fx.GraphModule) -> Chain:
    nodes = list(gm.graph.nodes)
    inputs = [n for n in nodes if n.op == "placeholder"]
    if len(inputs) != 1:
        raise _NoMatch(f"{len(inputs)} inputs (a block takes one)")
    x = inputs[0]
    out = next(n for n in nodes if n.op == "output").args[0]
    if not isinstance(out, fx.Node):
        raise _NoMatch("the output is not one tensor")
    reader = _Reader(gm)
    post: list[Op] = []
    node = out
    while isinstance(node, fx.Node) and len(node.users) <= 1:
        op = None
        act = _function_act(node)
        if act is not None:
            op = Op("act", arg=act)
        elif node.op == "call_module":
            m = gm.get_submodule(node.target)
            if isinstance(m, PASS_THROUGH):
                node = node.args[0]
                continue
            if type(m) in _ACT_MODULES or type(m) in (nn.GELU, nn.Hardtanh):
                try:
                    op = _module_op(m, node.target)
                except _NoMatch:
                    op = None
        if op is None:
            break
        post.insert(0, op)
        node = node.args[0]
    if node.op == "call_function" and node.target in ADDS and len(node.args) == 2 and all(
            isinstance(a, fx.Node) for a in node.args) and len(node.users) <= 1:
        chains = []
        for a in node.args:
            try:
                chains.append(reader.walk(a, x))
            except _NoMatch as e:
                chains.append(e)
        good = [c for c in chains if not isinstance(c, _NoMatch)]
        if len(good) == 2:
            ncv = [sum(o.kind in ("conv", "linear") for o in c) for c in good]
            body, short = (good[0], good[1]) if ncv[0] >= ncv[1] else (good[1], good[0])
            return Chain(body, short, post)
        err = next(c for c in chains if isinstance(c, _NoMatch))
        err.residual = True
        raise err
    return Chain(reader.walk(out, x), None, [])


def describe(module: nn.Module) -> Chain | Unmatched:
    """What ``module`` computes as a :class:`Chain`, or why it is not one
    (:class:`Unmatched`, a string)."""
    gm = trace(module)
    if gm is None:
        return _unmatched("does not trace symbolically (control flow on values)", False)
    try:
        return _read(gm)
    except _NoMatch as e:
        return _unmatched(str(e), getattr(e, "residual", False))


# -- patterns -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Pattern:
    """A block pattern: ``match(chain)`` returns None when the chain is this pattern
    (else why not), ``build(chain)`` the fused module."""

    name: str
    match: Callable[[Chain], str | None]
    build: Callable[[Chain], nn.Module]


PATTERNS: dict[str, Pattern] = {}


def register(pattern: Pattern, *, first: bool = False) -> Pattern:
    """Add ``pattern`` to the registry (``first``: tried before the built-in ones)."""
    if pattern.name in PATTERNS:
        raise ValueError(f"a pattern named {pattern.name!r} is already registered")
    if first:
        items = list(PATTERNS.items())
        PATTERNS.clear()
        PATTERNS[pattern.name] = pattern
        PATTERNS.update(items)
    else:
        PATTERNS[pattern.name] = pattern
    return pattern


def match(chain: Chain) -> tuple[Pattern | None, dict[str, str]]:
    """The first registered pattern taking ``chain`` (None if none), and each pattern's
    reason for not taking it."""
    why = {}
    for p in PATTERNS.values():
        reason = p.match(chain)
        if reason is None:
            return p, why
        why[p.name] = reason
    return None, why


def _fusable_conv(m: nn.Conv2d) -> str | None:
    if m.padding_mode != "zeros":
        return f"{m.padding_mode} padding"
    left, right, top, bottom = explicit_padding(m)
    if left != right or top != bottom:
        return "asymmetric padding"
    return None


def _conv_steps(ops: list[Op], residual: bool) -> tuple[list, list] | str:
    """convs and their activations from conv [act] conv [act] ... ops, or why not."""
    convs, acts = [], []
    for o in ops:
        if o.kind == "conv":
            why = _fusable_conv(o.module)
            if why:
                return f"{o.name}: {why}"
            convs.append(o.module)
            acts.append(None)
        elif o.kind == "act" and convs and acts[-1] is None:
            acts[-1] = o.arg
        else:
            return f"{o!r} where a convolution or its activation was expected"
    if not convs:
        return "no convolution"
    if residual and acts[-1] is not None:
        return "an activation before the residual add"
    return convs, acts


def _is_1x1(m: nn.Conv2d) -> bool:
    return tuple(m.kernel_size) == (1, 1) and m.groups == 1


def _is_dw(m: nn.Conv2d) -> bool:
    return m.groups == m.in_channels == m.out_channels and m.groups > 1


def _shortcut(chain: Chain):
    if chain.shortcut is None:
        return None
    if chain.shortcut == []:
        return "identity"
    return chain.shortcut[0].module


def _conv_chain_parts(chain: Chain) -> tuple | str:
    residual = chain.shortcut is not None
    steps = _conv_steps(chain.body, residual)
    if isinstance(steps, str):
        return steps
    if chain.shortcut:
        s = chain.shortcut
        if len(s) != 1 or s[0].kind != "conv" or _fusable_conv(s[0].module):
            return "the shortcut is not one convolution"
    if len(chain.post) > 1:
        return "more than one activation after the add"
    if not residual and chain.post:
        return "activation after nothing"
    return steps[0], steps[1], _shortcut(chain), (chain.post[0].arg if chain.post else None)


def _shape_rule(rule: Callable[[list, list, Any, Any], str | None]):
    def m(chain: Chain) -> str | None:
        parts = _conv_chain_parts(chain)
        if isinstance(parts, str):
            return parts
        return rule(*parts)
    return m


def _builder(cls):
    def build(chain: Chain) -> nn.Module:
        convs, acts, shortcut, post = _conv_chain_parts(chain)
        return cls(convs, acts, shortcut, post)
    return build


def _ir_rule(convs, acts, shortcut, post):
    shape = [("1x1" if _is_1x1(c) else "dw" if _is_dw(c) else "other") for c in convs]
    if shape not in (["1x1", "dw", "1x1"], ["dw", "1x1"]):
        return f"convolutions {shape}, not [1x1, depthwise, 1x1]"
    if any(a is None for a in acts[:-1]) or acts[-1] is not None:
        return "activations not after the expansion and the depthwise conv only"
    if not (shortcut in (None, "identity") and post is None):
        return "a shortcut other than the input, or an activation after the add"
    return None


def _basic_rule(convs, acts, shortcut, post):
    if len(convs) != 2 or any(_is_1x1(c) or c.groups != 1 for c in convs) or shortcut is None:
        return "not two dense kxk convolutions with a shortcut"
    return None if acts[0] is not None else "no activation between the convolutions"


def _bottleneck_rule(convs, acts, shortcut, post):
    if len(convs) != 3 or not (_is_1x1(convs[0]) and _is_1x1(convs[2])) or _is_dw(convs[1]) \
            or shortcut is None:
        return "not 1x1, kxk, 1x1 with a shortcut"
    return None if acts[0] is not None and acts[1] is not None else "missing activations"


def _convfirst_rule(convs, acts, shortcut, post):
    if len(convs) != 3 or _is_1x1(convs[0]) or not (_is_1x1(convs[1]) and _is_1x1(convs[2])):
        return "not kxk, 1x1, 1x1"
    if acts[0] is not None or acts[1] is None or shortcut != "identity":
        return "not kxk (no activation), 1x1 + activation, 1x1, + x"
    return None


def _conv_act_rule(convs, acts, shortcut, post):
    if len(convs) != 1 or shortcut is not None:
        return "not one convolution without a shortcut"
    return None


def _any_chain_rule(convs, acts, shortcut, post):
    return None


def _mbconv_parts(chain: Chain) -> tuple | str:
    ops = chain.body
    kinds = [o.kind for o in ops]
    expand = None
    if kinds[:2] == ["conv", "act"] and len(ops) > 2 and ops[2].kind == "conv" \
            and _is_1x1(ops[0].module):
        expand, act = ops[0].module, ops[1].arg
        ops = ops[2:]
    else:
        act = None
    kinds = [o.kind for o in ops]
    if kinds != ["conv", "act", "se", "conv"] or not _is_dw(ops[0].module) or \
            not _is_1x1(ops[3].module):
        return f"body {chain!r} is not [1x1 + act], depthwise + act, squeeze-excitation, 1x1"
    se = ops[2].arg
    sk = [o.kind for o in se]
    if sk != ["pool", "conv", "act", "conv", "act"] or not all(
            _is_1x1(se[i].module) and se[i].module.bias is not None for i in (1, 3)):
        return f"squeeze-excitation {se!r} is not pool, 1x1 + act, 1x1 + gate"
    if chain.post or chain.shortcut not in (None, []):
        return "a shortcut other than the input, or an activation after the add"
    for m in (expand, ops[0].module, ops[3].module):
        if m is not None and _fusable_conv(m):
            return _fusable_conv(m)
    return (expand, act or ops[1].arg, ops[0].module, ops[1].arg, se[1].module, se[2].arg,
            se[3].module, se[4].arg, ops[3].module, chain.shortcut == [])


def _convnext_parts(chain: Chain) -> tuple | str:
    ops = chain.body
    kinds = [o.kind for o in ops]
    scale, channels_last_scale = None, False
    if kinds[-1:] == ["scale"]:         # torchvision's, timm's: on the NCHW result
        scale, ops = ops[-1].arg, ops[:-1]
        kinds = kinds[:-1]
    elif kinds[-2:] == ["scale", "permute"]:  # the original ConvNeXt's: before the permute
        scale, channels_last_scale = ops[-2].arg, True
        ops, kinds = ops[:-2] + ops[-1:], kinds[:-2] + kinds[-1:]
    want = ["conv", "permute", "layernorm", "linear", "act", "linear", "permute"]
    if kinds != want or chain.shortcut != [] or chain.post:
        return f"body {chain!r} is not depthwise, LayerNorm, Linear + act, Linear, + x"
    dw, p1, ln, fc1, act, fc2, p2 = ops
    if not _is_dw(dw.module) or _fusable_conv(dw.module) or p1.arg != (0, 2, 3, 1) or \
            p2.arg != (0, 3, 1, 2):
        return "not a depthwise conv between NCHW/NHWC permutations"
    c = dw.module.out_channels
    if tuple(ln.module.normalized_shape) != (c,) or fc2.module.out_features != c:
        return "the LayerNorm or the last Linear is not over the block's channels"
    if scale is not None and scale.numel() != c:
        return "the scale is not one per channel"
    if scale is not None and scale.dim() >= 2 and (
            any(d != 1 for d in scale.shape[:-1]) if channels_last_scale
            else tuple(scale.shape[-2:]) != (1, 1)):
        return "the scale is not one per channel"
    return dw.module, ln.module, fc1.module, act.arg, fc2.module, scale


def _from_parts(parts: Callable[[Chain], tuple | str], cls: type
                ) -> tuple[Callable[[Chain], str | None], Callable[[Chain], nn.Module]]:
    """(match, build) of a pattern whose ``parts(chain)`` is the fused module's arguments
    or why the chain is not the pattern."""
    def matches(chain: Chain) -> str | None:
        got = parts(chain)
        return got if isinstance(got, str) else None

    def build(chain: Chain) -> nn.Module:
        return cls(*parts(chain))
    return matches, build


for _p in (
    Pattern("inverted_residual", _shape_rule(_ir_rule),
            _builder(fb.FusedInvertedResidual)),
    Pattern("mbconv", *_from_parts(_mbconv_parts, fb.FusedMBConv)),
    Pattern("basic", _shape_rule(_basic_rule), _builder(fb.FusedBasicBlock)),
    Pattern("bottleneck", _shape_rule(_bottleneck_rule),
            _builder(fb.FusedBottleneck)),
    Pattern("convfirst", _shape_rule(_convfirst_rule),
            _builder(fb.FusedConvFirst)),
    Pattern("convnext", *_from_parts(_convnext_parts, fb.FusedConvNeXt)),
    Pattern(CONV_ACT, _shape_rule(_conv_act_rule), _builder(fb.FusedConvAct)),
    Pattern("conv_chain", _shape_rule(_any_chain_rule),
            _builder(fb.FusedConvChain)),
):
    register(_p)


# -- the classifier head: matched on the model's graph, not a block's -----------------------
HEAD = "pool_linear"  # its pattern name (fuse's ``patterns`` takes it beside PATTERNS')


@dataclass
class Head:
    """A classifier head ending a model: global average pool -> flatten -> [dropout] ->
    linear, each called once. ``pool``, ``linear``: the modules' qualified names;
    ``steps``: what runs between them, in order (a module's name, or None for a
    ``torch.flatten(x, 1)`` call); ``p``: the dropout probability (0: none)."""

    pool: str
    linear: str
    steps: list[str | None]
    p: float

    def modules(self) -> list[str]:
        """The modules the fused head replaces after the pool, in order."""
        return [s for s in self.steps if s is not None] + [self.linear]

    def run(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The head as the model runs it, from the pool's input ``x``."""
        h = model.get_submodule(self.pool)(x)
        for s in self.steps:
            h = torch.flatten(h, 1) if s is None else model.get_submodule(s)(h)
        return model.get_submodule(self.linear)(h)


def global_pool(m: nn.Module) -> bool:
    size = m.output_size if isinstance(m, nn.AdaptiveAvgPool2d) else None
    return size in (1, (1, 1), [1, 1])


def flatten_call(node: fx.Node) -> bool:
    """``torch.flatten(x, 1)`` or ``x.flatten(1)`` (to the last dimension)."""
    if node.op == "call_function" and node.target is torch.flatten or \
            node.op == "call_method" and node.target == "flatten":
        args = list(node.args[1:]) + [None] * 2
        start = node.kwargs.get("start_dim", args[0])
        end = node.kwargs.get("end_dim", args[1] if args[1] is not None else -1)
        return start == 1 and end == -1
    return False


def find_head(model: nn.Module) -> Head | str:
    """The classifier head ending ``model`` (see :class:`Head`), or why there is none."""
    gm = trace(model)
    if gm is None:
        return "the model does not trace symbolically"
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    calls: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            calls[n.target] = calls.get(n.target, 0) + 1

    def module(node) -> nn.Module | None:
        if isinstance(node, fx.Node) and node.op == "call_module" and calls[node.target] == 1:
            return gm.get_submodule(node.target)
        return None

    lin = module(out)
    if not isinstance(lin, nn.Linear):
        return "the output is not a linear layer's, called once"
    steps: list[str | None] = []
    p, flat, node = 0.0, False, out.args[0] if out.args else None
    while isinstance(node, fx.Node) and len(node.users) == 1:
        m = module(node)
        if m is not None and global_pool(m):
            if not flat:
                return "no flatten between the pool and the linear layer"
            return Head(node.target, out.target, steps[::-1], p)
        if isinstance(m, nn.Identity):  # left as it is
            node = node.args[0]
            continue
        if type(m) is nn.Dropout and p == 0.0:
            p = m.p
        elif isinstance(m, nn.Flatten) and m.start_dim == 1 and m.end_dim == -1 and not flat:
            flat = True
        elif flatten_call(node) and not flat:
            flat = True
            steps.append(None)
            node = node.args[0]
            continue
        else:
            break
        steps.append(node.target)
        node = node.args[0]
    return "the linear layer does not follow a global average pool, flatten and dropout"


STEM = "stem_block"  # its pattern name (beside PATTERNS' and HEAD)
NETWORK = "network"  # the whole network as one oneDNN plan (fuse; transforms.lower)


def block_patterns() -> list[str]:
    """Every pattern name ``fuse`` takes but the whole-network plan (:data:`NETWORK`): the
    registered block patterns, the head and the stem block (for what predicts or
    calibrates blocks, which the plan is not yet)."""
    return [*PATTERNS, HEAD, STEM]
STEM_MAX_CHANNELS = 4  # a stem reads an image: the kernel broadcasts each input channel


def find_stems(model: nn.Module) -> list[tuple[str, str]]:
    """The (stem, block) module-name pairs of a model whose blocks :func:`convgap.fuse`
    has fused, to run as one :class:`~convgap.layers.FusedStemBlock`: a fused conv + act
    from at most :data:`STEM_MAX_CHANNELS` channels (groups 1) whose output only feeds a
    fused inverted residual or MBConv without expansion and without residual (depthwise at
    stride 1, [squeeze-excitation,] a 1x1), each called once. The trace is of the fused
    model."""
    gm = trace(model)
    if gm is None:
        return []
    calls: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            calls[n.target] = calls.get(n.target, 0) + 1
    pairs = []
    for n in gm.graph.nodes:
        if n.op != "call_module" or calls[n.target] != 1 or len(n.users) != 1:
            continue
        first = gm.get_submodule(n.target)
        user = next(iter(n.users))
        if (type(first) is not fb.FusedConvAct or len(first.convs) != 1
                or first.convs[0].groups != 1
                or first.convs[0].in_channels > STEM_MAX_CHANNELS
                or user.op != "call_module" or calls[user.target] != 1
                or user.args[:1] != (n,) or len(user.args) != 1 or user.kwargs):
            continue
        block = gm.get_submodule(user.target)
        if type(block) is fb.FusedInvertedResidual and len(block.convs) == 2 and not (
                block.identity or block.shortcut is not None or block.post is not None):
            dw = block.convs[0]
        elif type(block) is fb.FusedMBConv and block.expand is None and not block.residual:
            dw = block.depthwise
        else:
            continue
        if dw.groups == dw.in_channels and tuple(dw.stride) == (1, 1):
            pairs.append((n.target, user.target))
    return pairs


@dataclass
class ConvAct:
    """A convolution whose output only feeds an activation module, outside the blocks
    ``fuse`` matched (a ResNet's stem: conv1 -> [bn1, folded] -> relu, written in the
    model's own forward rather than as a block): ``conv`` and ``act`` module names, ``name``
    the activation's (:data:`convgap.ops.activations.ACTIVATIONS`)."""

    conv: str
    act: str
    name: str


def find_conv_acts(model: nn.Module, taken: Sequence[str] = ()) -> list[ConvAct]:
    """Every plain ``nn.Conv2d`` of ``model``'s traceable parts (:func:`.trace.roots`) not
    inside the modules named in ``taken``, called once, whose output goes only to an
    activation module called once, through modules that compute nothing in eval
    (identities: folded batch-norms; dropout), each taking the one before as its only
    argument: the pairs :func:`convgap.fuse` runs as :class:`~convgap.layers.FusedConvAct`
    (the activation's module replaced by an identity, so it must not be shared)."""
    out = []
    for prefix, _, gm in roots(model):
        calls: dict[str, int] = {}
        for n in gm.graph.nodes:
            if n.op == "call_module":
                calls[n.target] = calls.get(n.target, 0) + 1

        def full(target: str) -> str:
            return f"{prefix}.{target}" if prefix else target

        def alone(node: fx.Node, after: fx.Node) -> bool:
            return (node.op == "call_module" and calls[node.target] == 1
                    and node.args == (after,) and not node.kwargs)
        for n in gm.graph.nodes:
            if n.op != "call_module" or calls[n.target] != 1:
                continue
            name = full(n.target)
            conv = gm.get_submodule(n.target)
            if type(conv) is not nn.Conv2d or blocker(conv) is not None or any(
                    name == t or name.startswith(t + ".") for t in taken):
                continue
            node = n
            while len(node.users) == 1 and alone(user := next(iter(node.users)), node):
                m = gm.get_submodule(user.target)
                if isinstance(m, PASS_THROUGH):
                    node = user
                    continue
                try:
                    op = _module_op(m, user.target)
                except _NoMatch:   # an operation no pattern takes
                    op = None
                if op is not None and op.kind == "act":
                    out.append(ConvAct(name, full(user.target), op.arg))
                break
    return out
