"""Residual and dense blocks found by structure: :func:`find_blocks`.

One forward pass records the dataflow between leaf-module calls and the torch functions
called outside leaf modules (a ``TorchFunctionMode``: additions, concatenations, views,
activations written as functions), each function call owned by the innermost non-leaf
module running it. A non-leaf module is then

- a **residual block** when its output is (up to trailing activations) an addition, done in
  its own ``forward``, of two tensors that both derive from its input: the input itself or
  a projection of it (the *shortcut*: the operand with fewer layers behind it) and the
  *body*;
- a **dense block** when its output is a concatenation, done in its own ``forward``, that
  includes its input.

Residual blocks are named by their body's convolutions: 'basic' (two kxk), 'bottleneck'
(1x1, kxk, 1x1), 'inverted_residual' (1x1 expansion, depthwise, 1x1 projection),
'depthwise_separable' (depthwise, 1x1), 'convnext' (depthwise, then Linear or 1x1 layers
at the same width and 4x it), else 'residual'. A ``block_kind`` class attribute, or a
well-known class name (torchvision/timm), is a hint: such a module is a block of that kind
even where the structure does not show a residual (a strided inverted residual). Works on
any model that runs: control flow is whatever the forward did; nothing is symbolic.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode
from torch.utils.weak import WeakIdKeyDictionary

__all__ = ["BlockInfo", "Recorder", "find_blocks", "block_kind", "unclassified",
           "KNOWN_BLOCKS", "tensors"]

# Residual-block classes of common third-party zoos: hints, recognised by class name.
KNOWN_BLOCKS = {
    "BasicBlock": "basic", "Bottleneck": "bottleneck", "InvertedResidual": "inverted_residual",
    "MBConv": "mbconv", "FusedMBConv": "fused_mbconv", "CNBlock": "convnext",
    "ConvNeXtBlock": "convnext", "DepthwiseSeparableConv": "depthwise_separable",
}

_ADDS = {"add", "add_", "__add__", "__iadd__", "__radd__"}
_CATS = {"cat", "concat", "concatenate"}
# one-input functions that keep a block's output a function of the same sum
_PASS_FUNCTIONS = {"relu", "relu_", "relu6", "hardtanh", "hardtanh_", "silu", "silu_", "gelu",
                   "sigmoid", "hardswish", "hardswish_", "mish", "leaky_relu", "leaky_relu_",
                   "elu", "elu_", "tanh", "dropout", "contiguous", "clone", "__mul__",
                   "mul", "mul_", "__rmul__"}
_PASS_MODULES = (nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Hardswish, nn.Mish, nn.LeakyReLU,
                 nn.ELU, nn.Tanh, nn.Sigmoid, nn.Identity, nn.Dropout, nn.Dropout2d,
                 nn.PReLU)


def block_kind(module: nn.Module) -> str | None:
    """The hinted block kind of ``module`` (its class's ``block_kind`` attribute or a
    well-known class name), or None."""
    kind = getattr(type(module), "block_kind", None)
    if isinstance(kind, str):
        return kind
    return KNOWN_BLOCKS.get(type(module).__name__)


@dataclass
class BlockInfo:
    """One block: its module name, kind, how it was found ('structure' or 'hint'), and for
    residual blocks the names of the leaf modules on the body and on the shortcut (empty
    for an identity shortcut)."""

    name: str
    kind: str
    found_by: str
    body: list[str] = field(default_factory=list)
    shortcut: list[str] = field(default_factory=list)


@dataclass
class _Node:
    op: str                       # function name, or 'module' for a leaf-module call
    parents: tuple[int, ...]
    owner: nn.Module | None       # innermost non-leaf module running it
    module: nn.Module | None = None
    shape: tuple[int, ...] = ()   # a leaf call's (first) output shape


@dataclass
class _Call:
    module: nn.Module
    inputs: tuple[int, ...]
    start: int                    # first node index created during the call
    outputs: tuple[int, ...] = ()


def tensors(obj: Any) -> list[torch.Tensor]:
    """The tensors in ``obj`` (a tensor, or tuples, lists and dicts of them), in order."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in tensors(o)]
    if isinstance(obj, dict):
        return [t for o in obj.values() for t in tensors(o)]
    return []


class _Flow(TorchFunctionMode):
    """The dataflow recorder: nodes for leaf-module calls and free functions, a tag per
    live tensor naming the node that produced it last."""

    def __init__(self, leaves: set[nn.Module]) -> None:
        super().__init__()
        self.leaves = leaves
        self.nodes: list[_Node] = []
        self.tags = WeakIdKeyDictionary()
        self.stack: list[nn.Module] = []      # running non-leaf modules
        self.in_leaf = 0
        self.calls: list[_Call] = []
        self.open: list[_Call] = []

    def node_of(self, t: torch.Tensor) -> int:
        n = self.tags.get(t)
        if n is None:  # a model input, a parameter, a constant
            n = self._add(_Node("source", (), None))
            self.tags[t] = n
        return n

    def _add(self, node: _Node) -> int:
        self.nodes.append(node)
        return len(self.nodes) - 1

    def _tag(self, out: Any, n: int) -> None:
        for t in tensors(out):
            self.tags[t] = n

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.in_leaf:
            return func(*args, **kwargs)
        parents = tuple(self.node_of(t) for t in tensors(args) + tensors(kwargs))
        out = func(*args, **kwargs)
        if parents and tensors(out):
            name = getattr(func, "__name__", str(func))
            n = self._add(_Node(name, parents, self.stack[-1] if self.stack else None))
            self._tag(out, n)
            first = args[0] if args else None
            if (name.endswith("_") or name.startswith("__i")) and \
                    isinstance(first, torch.Tensor) and first._base is not None:
                self.tags[first._base] = n  # x[:, :c] += s changes x too
        return out

    # -- module hooks ------------------------------------------------------------------
    def pre(self, m: nn.Module, args: tuple) -> None:
        if m in self.leaves:
            if not self.in_leaf:
                for t in tensors(args):
                    self.node_of(t)
            self.in_leaf += 1
            return
        if self.in_leaf:
            return
        call = _Call(m, tuple(self.node_of(t) for t in tensors(args)), len(self.nodes))
        self.open.append(call)
        self.stack.append(m)

    def post(self, m: nn.Module, args: tuple, out: Any) -> None:
        if m in self.leaves:
            self.in_leaf -= 1
            if not self.in_leaf:
                parents = tuple(self.node_of(t) for t in tensors(args))
                owner = self.stack[-1] if self.stack else None
                outs = tensors(out)
                shape = tuple(outs[0].shape) if outs else ()
                self._tag(out, self._add(_Node("module", parents, owner, m, shape)))
            return
        if self.in_leaf:
            return
        call = self.open.pop()
        self.stack.pop()
        call.outputs = tuple(self.node_of(t) for t in tensors(out))
        self.calls.append(call)

    # -- analysis ----------------------------------------------------------------------
    def _computed(self, node: _Node, x: int) -> list[int]:
        """A node's parents that were computed (not parameters or constants), and ``x``."""
        return [p for p in node.parents if self.nodes[p].op != "source" or p == x]

    def _unwrap(self, n: int, start: int, x: int) -> int:
        """Walk back from ``n`` through one-input activations (and scalings by parameters)
        made during the call that began at node ``start``."""
        while n >= start:
            node = self.nodes[n]
            passes = (node.op == "module" and isinstance(node.module, _PASS_MODULES)) or \
                node.op in _PASS_FUNCTIONS
            computed = self._computed(node, x)
            if not passes or len(computed) != 1:
                return n
            n = computed[0]
        return n

    def _ancestry(self, n: int, start: int, stops: tuple[int, ...]
                  ) -> tuple[set[int], list[_Node]]:
        """Which of the nodes ``stops`` node ``n`` derives from through nodes made since
        ``start``, and the leaf-module calls on the way (in call order)."""
        seen, todo, hit, mods = set(), [n], set(), []
        while todo:
            k = todo.pop()
            if k in seen:
                continue
            seen.add(k)
            if k in stops:
                hit.add(k)
                continue
            if k < start:
                continue
            node = self.nodes[k]
            if node.module is not None:
                mods.append(k)
            todo.extend(node.parents)
        return hit, [self.nodes[k] for k in sorted(mods)]

    def classify(self, call: _Call) -> tuple[str, list[_Node], list[_Node]] | None:
        """('residual', body, shortcut) or ('dense', body, []) for a block call (the
        leaf-module calls of each side), else None."""
        if len(call.outputs) != 1 or not call.inputs:
            return None
        x = call.inputs[0]
        ins = call.inputs
        top = self._unwrap(call.outputs[0], call.start, x)
        if top < call.start:
            return None
        node = self.nodes[top]
        if node.owner is not call.module:
            return None
        if node.op in _ADDS:
            operands = [p for p in node.parents if self.nodes[p].op != "source" or p in ins]
            if len(operands) != 2:
                return None
            (hit_a, a), (hit_b, b) = [self._ancestry(p, call.start, ins) for p in operands]
            # both sides from the same input, or one side an input itself (a shortcut
            # projected by the caller and passed in, as in DLA's trees)
            if not (hit_a & hit_b or (hit_a and hit_b and any(p in ins for p in operands))):
                return None
            body, shortcut = (a, b) if len(a) >= len(b) else (b, a)
            shortcut = [m for m in shortcut if all(m is not n for n in body)]
            return "residual", body, shortcut
        if node.op in _CATS and x in node.parents:
            _, body = self._ancestry(top, call.start, (x,))
            return "dense", body, []
        return None


def _residual_kind(body: list[_Node]) -> str:
    """Name a residual block by its body's convolutions and linear layers in call order
    (squeeze-excitation layers, convs on 1x1 maps and linears on (N, C) vectors, left out;
    parallel or hierarchical filters between two 1x1 convs, as in MixNet and Res2Net,
    count as one)."""
    layers = [n for n in body if isinstance(n.module, (nn.Conv2d, nn.Linear))
              and not (isinstance(n.module, nn.Conv2d) and n.shape[-2:] == (1, 1))
              and not (isinstance(n.module, nn.Linear) and len(n.shape) == 2)]
    convs = [n.module for n in layers]
    seq = ["linear" if isinstance(m, nn.Linear)
           else "dw" if m.groups == m.in_channels > 1
           else "1x1" if tuple(m.kernel_size) == (1, 1) else "kxk" for m in convs]
    if seq and seq[0] == "dw" and ("linear" in seq or seq[1:] == ["1x1", "1x1"]):
        return "convnext"
    if seq == ["kxk", "kxk"]:
        return "basic"
    if seq == ["dw", "1x1"]:
        return "depthwise_separable"
    if len(seq) >= 3 and seq[0] == seq[-1] == "1x1":
        middle = set(seq[1:-1])
        if middle == {"dw"} and convs[0].out_channels >= convs[0].in_channels:
            return "inverted_residual"
        if middle <= {"dw", "kxk"}:
            return "bottleneck"
    return "residual"


class Recorder:
    """Records one forward pass of ``model`` (``with Recorder(model) as rec: model(x)``)
    and then tells its blocks (:meth:`blocks`). Other hooks and modes may run alongside."""

    def __init__(self, model: nn.Module) -> None:
        self.names: dict[nn.Module, str] = {}
        for n, m in model.named_modules(remove_duplicate=False):
            self.names.setdefault(m, n)  # a shared module keeps its first name
        self.leaves = {m for m in self.names if next(m.children(), None) is None}
        self._flow = _Flow(self.leaves)
        self._handles: list = []

    def __enter__(self) -> "Recorder":
        for m in self.names:
            self._handles.append(m.register_forward_pre_hook(self._flow.pre))
            self._handles.append(m.register_forward_hook(self._flow.post))
        self._flow.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._flow.__exit__(*exc)
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def blocks(self) -> dict[nn.Module, BlockInfo]:
        """The blocks seen (residual and dense by structure, plus hinted ones), keyed by
        module, in the order their first calls ended."""
        found: dict[nn.Module, BlockInfo] = {}
        for call in self._flow.calls:
            m = call.module
            if m in found:
                continue
            shape = self._flow.classify(call)
            hint = block_kind(m)
            if shape is None and hint is None:
                continue
            if shape is None:
                found[m] = BlockInfo(self.names[m], hint, "hint")
                continue
            what, body, shortcut = shape
            kind = hint or ("dense" if what == "dense" else _residual_kind(body))
            found[m] = BlockInfo(self.names[m], kind, "structure",
                                 [self.names[b.module] for b in body],
                                 [self.names[s.module] for s in shortcut])
        return found


@torch.no_grad()
def find_blocks(model: nn.Module, *args: Any) -> dict[nn.Module, BlockInfo]:
    """Run ``model(*args)`` once (in its current mode) and return its blocks: residual and
    dense by structure, plus hinted ones, keyed by module (:meth:`Recorder.blocks`)."""
    with Recorder(model) as rec:
        model(*args)
    return rec.blocks()


def unclassified(model: nn.Module, blocks: dict[nn.Module, BlockInfo]) -> list[str]:
    """The model's top-level modules holding two or more convolutions but no block: where
    no residual or dense block was recognised (no waterline, no fusion estimate)."""
    inside = set()
    for b in blocks:
        inside.update(b.modules())
    out = []
    for n, child in model.named_children():
        convs = sum(isinstance(m, nn.Conv2d) for m in child.modules())
        if convs >= 2 and not any(m in inside for m in child.modules()):
            out.append(f"{n} ({type(child).__name__}, {convs} convolutions)")
    return out
